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
import contextlib
import datetime
import functools
import threading
from typing import Any

import torch
import torch.distributed as dist

from ringlib.errors import CollectiveTimeout, RingClosed

from . import torch_spans

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
    """A then() callback: the op's outputs, or raise its error. Python's set_exception
    only stores the exception as the future's value, which C++ callers (DDP) would take
    for the outputs; an error raised in a then() callback is one that C++ sees."""
    value = settled.value()
    if isinstance(value, BaseException):
        raise value
    return value


def joined(futures: list[concurrent.futures.Future]) -> concurrent.futures.Future:
    """A future done when all of `futures` are, with the first one's error, if any."""
    if len(futures) == 1:
        return futures[0]
    whole: concurrent.futures.Future = concurrent.futures.Future()
    left, lock = [len(futures)], threading.Lock()

    def one_done(_: concurrent.futures.Future) -> None:
        with lock:
            left[0] -= 1
            if left[0]:
                return
        failed = [f for f in futures if f.cancelled() or f.exception() is not None]
        if not failed:
            whole.set_result(None)
        elif failed[0].cancelled():
            whole.cancel()
            whole.set_running_or_notify_cancel()
        else:
            whole.set_exception(failed[0].exception())

    for future in futures:
        future.add_done_callback(one_done)
    if not futures:
        whole.set_result(None)
    return whole


class _Backwards:
    """The ops started inside each running backward pass (by autograd graph task), and
    the check at its end, which waits for them and raises the first error that nobody
    has seen through wait() yet. That check may run before the trainer's own (DDP queues
    its own once the last bucket is ready): so it waits, rather than looking only at
    those done already. A pass that fails never runs its check: its ops are dropped here
    once all are done and none failed, or else once they are more than KEPT passes old."""

    KEPT = 64

    def __init__(self) -> None:
        self._works: dict[int, list[RingWork]] = {}

    def watch(self, work: RingWork) -> bool:
        """Whether `work` started inside a backward pass, which now checks it at its end."""
        task = torch._C._current_graph_task_id()
        if task < 0:
            return False
        works = self._works.get(task)
        if works is None:
            self._forget_finished()
            works = self._works[task] = []
            torch.autograd.Variable._execution_engine.queue_callback(
                functools.partial(self._check, task))
        works.append(work)
        return True

    def _check(self, task: int) -> None:
        for work in self._works.pop(task, ()):
            work.raise_unseen()

    def _forget_finished(self) -> None:
        """Drop the passes whose ops all succeeded, and all but the newest KEPT."""
        for task in list(self._works)[:-self.KEPT]:
            del self._works[task]
        for task, works in list(self._works.items()):
            if all(work.is_success() for work in works):
                del self._works[task]


_backwards = _Backwards()


class RingWork(dist.Work):
    """An op running as `running` (the loop's future), which fills `outputs`.

    Its torch future is made on the first get_future() (a synchronous dist.* call only
    waits, and a small op then costs no future and no thread hop) and completed on the
    completing thread once it exists and the op is done: whichever of the two comes
    second settles it, decided under the lock."""

    def __init__(self, running: concurrent.futures.Future, outputs: list[torch.Tensor],
                 what: str) -> None:
        super().__init__()
        self._running, self._outputs, self._what = running, outputs, what
        self._lock = threading.Lock()
        self._settled: torch.futures.Future | None = None
        self._future: torch.futures.Future | None = None
        self._done = False
        self._seen = False  # whether wait() has raised the error
        self._in_backward = _backwards.watch(self)
        running.add_done_callback(self._finished)

    def _finished(self, _: concurrent.futures.Future) -> None:
        with self._lock:
            self._done = True
            settle = self._settled is not None
        if settle:
            _completing().submit(self._settle)

    def get_future(self) -> torch.futures.Future:
        with self._lock:
            settle = self._future is None and self._done
            if self._future is None:
                self._settled = torch.futures.Future()
                self._future = self._settled.then(_unwrap)
        if settle:
            _completing().submit(self._settle)
        return self._future

    def _settle(self) -> None:
        error = self.error()
        self._settled.set_result(self._outputs if error is None or self._in_backward
                                 else error)

    def error(self) -> BaseException | None:
        """What the finished op raised (None while it runs, or if it succeeded)."""
        if not self._running.done():
            return None
        if self._running.cancelled():
            return RingClosed(f"{self._what}: its group was destroyed before it finished")
        return self._running.exception()

    def wait(self, timeout: datetime.timedelta | None = None) -> bool:
        """Block until the op is done, and raise what it raised; a positive `timeout`
        bounds the wait (CollectiveTimeout after it; the op itself carries on)."""
        limit = timeout.total_seconds() if timeout is not None else 0.0
        with torch_spans.span("wait") or contextlib.nullcontext():
            done, _ = concurrent.futures.wait([self._running], limit if limit > 0 else None)
        if not done:
            raise CollectiveTimeout(f"{self._what} did not finish within wait()'s "
                                    f"timeout of {limit:g} s")
        self._raise(seen_too=True)
        return True

    def raise_unseen(self) -> None:
        """Wait for the op, and raise its error unless a wait() raised it already."""
        concurrent.futures.wait([self._running])
        self._raise(seen_too=False)

    def _raise(self, seen_too: bool) -> None:
        error = self.error()
        if error is not None and (seen_too or not self._seen):
            self._seen = True
            raise error

    def is_completed(self) -> bool:
        return self._running.done()

    def is_success(self) -> bool:
        return self._running.done() and self.error() is None

    def result(self) -> list[torch.Tensor]:
        self.wait()
        return self._outputs
