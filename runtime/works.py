"""What an op on a ringlib process group returns: a torch Work over a coroutine that runs
on the group ring's loop thread.

wait() raises ringlib's own errors (PeerLost, MismatchError, CollectiveTimeout, ...). The
torch future of get_future() is completed on a thread of its own, never the loop's, so a
.then() callback that blocks cannot stall the ring; its value is the list of output
tensors. A torch future carries an error only as RuntimeError text, and DDP fails backward
with that text where it meets one; so an op started inside a backward pass completes its
future even when it fails, and a callback queued at the end of that backward pass waits
for the ops it started and raises the first one's ringlib error itself (_Backwards):
backward raises PeerLost, as wait() does, never a silently wrong gradient.
"""

from __future__ import annotations

import concurrent.futures
import datetime
import functools
import threading
from typing import Any

import torch
import torch.distributed as dist

from ringlib.errors import CollectiveTimeout

_completer: concurrent.futures.ThreadPoolExecutor | None = None
_completer_lock = threading.Lock()


def _completing() -> concurrent.futures.ThreadPoolExecutor:
    """The thread that completes every torch future, in the order the ops finish."""
    global _completer
    with _completer_lock:
        if _completer is None:
            _completer = concurrent.futures.ThreadPoolExecutor(
                1, thread_name_prefix="ringlib-futures")
        return _completer


def _unwrap(settled: torch.futures.Future) -> Any:
    value = settled.value()
    if isinstance(value, BaseException):
        raise value
    return value


class _Backwards:
    """The ops started inside each running backward pass (by autograd graph task), and
    the check at its end, which waits for them and raises the first one's error. That
    check may run before the trainer's own (DDP queues its own once the last bucket is
    ready): so it waits, rather than looking only at those done already."""

    def __init__(self) -> None:
        self._works: dict[int, list[RingWork]] = {}

    def watch(self, work: RingWork) -> bool:
        """Whether `work` started inside a backward pass, which now checks it at its end."""
        task = torch._C._current_graph_task_id()
        if task < 0:
            return False
        works = self._works.get(task)
        if works is None:
            works = self._works[task] = []
            torch.autograd.Variable._execution_engine.queue_callback(
                functools.partial(self._check, task))
        works.append(work)
        return True

    def _check(self, task: int) -> None:
        for work in self._works.pop(task, ()):
            work.wait()


_backwards = _Backwards()


class RingWork(dist.Work):
    """An op running as `running` (the loop's future), which fills `outputs`."""

    def __init__(self, running: concurrent.futures.Future, outputs: list[torch.Tensor],
                 what: str) -> None:
        super().__init__()
        self._running, self._outputs, self._what = running, outputs, what
        self._settled = torch.futures.Future()
        self._future = self._settled.then(_unwrap)
        self._in_backward = _backwards.watch(self)
        running.add_done_callback(lambda _: _completing().submit(self._settle))

    def _settle(self) -> None:
        error = self.error()
        self._settled.set_result(self._outputs if error is None or self._in_backward
                                 else error)

    def error(self) -> BaseException | None:
        """What the finished op raised (None while it runs, or if it succeeded)."""
        if not self._running.done():
            return None
        if self._running.cancelled():
            return concurrent.futures.CancelledError(f"{self._what} was cancelled")
        return self._running.exception()

    def wait(self, timeout: datetime.timedelta | None = None) -> bool:
        """Block until the op is done, and raise what it raised; a positive `timeout`
        bounds the wait (CollectiveTimeout after it; the op itself carries on)."""
        limit = timeout.total_seconds() if timeout is not None else 0.0
        done, _ = concurrent.futures.wait([self._running], limit if limit > 0 else None)
        if not done:
            raise CollectiveTimeout(f"{self._what} did not finish within wait()'s "
                                    f"timeout of {limit:g} s")
        error = self.error()
        if error is not None:
            raise error
        return True

    def get_future(self) -> torch.futures.Future:
        return self._future

    def is_completed(self) -> bool:
        return self._running.done()

    def is_success(self) -> bool:
        return self._running.done() and self.error() is None

    def result(self) -> list[torch.Tensor]:
        self.wait()
        return self._outputs
