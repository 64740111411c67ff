"""The blocking facade: a Ring whose event loop runs in a background thread.

For ordinary training loops: init() takes connect()'s arguments, and every collective
takes the same arguments as the Ring's and returns its result instead of a coroutine.
Calls from one thread run in the order they are made; a Ctrl-C while one waits cancels it.

Collectives are numbered in the order they are called, the same on every rank. Two
threads calling at once would be ordered differently on different ranks, and pair up
wrong collectives: so one thread at a time may have collectives in flight, and a call
from another meanwhile raises UsageError. A collective from a thread other than the one
that made the ring carries that thread's name in its signature (less the counters in
default names), so that collectives of differently named threads never pair up across
ranks (they raise MismatchError).
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import functools
import re
import threading
from typing import Any, Callable, Coroutine, TypeVar

import numpy as np

from ringlib.errors import RingClosed, UsageError

from ringlib.collectives.compiled import Pending

from . import signals, torch_spans
from .ring import CALLER, Ring, connect

T = TypeVar("T")
_COUNTED = re.compile(r"[-_]\d+")  # the counters in default thread names: see _kind_of
STOP_S = 10.0  # how long a stopping loop waits for its cancelled tasks


class LoopThread:
    """An asyncio event loop running forever in a daemon thread."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self._thread.start()

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        future = self.submit(coro)
        try:
            return future.result()
        except BaseException:
            future.cancel()  # KeyboardInterrupt while waiting: stop the coroutine too
            raise

    def stop(self) -> None:
        """Cancel what still runs on the loop, let it clean up (for at most STOP_S), then
        stop the loop and its thread."""
        try:
            self.submit(_cancel_the_rest()).result(STOP_S)
        except (concurrent.futures.TimeoutError, concurrent.futures.CancelledError):
            pass
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()
        self.loop.close()


async def _cancel_the_rest() -> None:
    """Cancel every other task of this loop and wait until they have finished."""
    tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


class _Callers:
    """Whose collectives are in flight on one blocking ring: one thread's at a time."""

    def __init__(self, rank: Callable[[], int]) -> None:
        self._rank = rank
        self._owner = threading.get_ident()  # the thread that made the ring
        self._lock = threading.Lock()
        self._busy: threading.Thread | None = None
        self._busy_id = 0
        self._count = 0

    def enter(self, what: str) -> str:
        """Count in a collective of the calling thread, or raise UsageError if another
        thread's are in flight; return what its signature carries of the caller."""
        me = threading.get_ident()  # a microsecond of every call is at stake: no Thread
        with self._lock:
            if self._count and self._busy_id != me:
                raise UsageError(
                    f"rank {self._rank()}: thread {threading.current_thread().name!r} called "
                    f"{what} while a collective of thread {self._busy.name!r} is in flight; "
                    "collectives are numbered in call order, the same on every rank, so one "
                    "blocking ring takes them from one thread at a time (hand the calls to "
                    "one thread, or give each thread a ring of its own)")
            if self._busy_id != me:
                self._busy, self._busy_id = threading.current_thread(), me
            self._count += 1
        return "" if me == self._owner else _kind_of(self._busy.name)

    def leave(self, *_: object) -> None:
        with self._lock:
            self._count -= 1

    def alone(self) -> bool:
        """Whether the one collective counted in is the only one in flight."""
        return self._count == 1


def _kind_of(name: str) -> str:
    """A thread's name without the numbers Python and executors count threads by
    ('Thread-3 (train)', 'asyncio_0', 'ThreadPoolExecutor-0_1'), which differ between
    ranks that run the same program: 'Thread (train)', 'asyncio', 'ThreadPoolExecutor'."""
    return _COUNTED.sub("", name)


async def _as(caller: str, call: Coroutine[Any, Any, T]) -> T:
    """Run `call` as from the thread named `caller` (see CALLER)."""
    CALLER.set(caller)
    return await call


def _blocking(method: Callable[..., Coroutine[Any, Any, T]],
              start: Callable[..., Pending | None] | None = None) -> Callable[..., T]:
    """The blocking form of a Ring coroutine method. With `start` (the Ring's _start_*
    of a collective the compiled path runs), a call made while nothing else is in flight
    on the ring starts it on the calling thread, and only a wait past the spin budget
    goes to the loop thread."""
    name = method.__name__

    def run(self: BlockingRing, *args: Any, **kwargs: Any) -> T:
        thread, callers = self._loop_thread(), self._callers
        caller = callers.enter(name)
        try:
            ring = self.ring
            if start is not None and callers.alone() and ring.idle:
                pending = start(ring, *args, caller=caller, **kwargs)
                if pending is not None:
                    return pending.value() if pending.done else thread.run(pending.finish())
            return thread.run(_as(caller, method(ring, *args, **kwargs)))
        finally:
            callers.leave()

    @functools.wraps(method)
    def call(self: BlockingRing, *args: Any, **kwargs: Any) -> T:
        span = torch_spans.span(name)
        if span is None:
            return run(self, *args, **kwargs)
        with span:
            return run(self, *args, **kwargs)
    return call


def _nowait(method: Callable[..., Coroutine[Any, Any, T]]) -> Callable[..., concurrent.futures.Future[T]]:
    def call(self: BlockingRing, *args: Any, **kwargs: Any) -> concurrent.futures.Future[T]:
        thread = self._loop_thread()
        caller = self._callers.enter(method.__name__)
        try:
            future = thread.submit(_as(caller, method(self.ring, *args, **kwargs)))
        except BaseException:
            self._callers.leave()
            raise
        future.add_done_callback(self._callers.leave)
        return future
    call.__name__ = f"{method.__name__}_async"
    call.__doc__ = (f"Start {method.__name__} and return a concurrent.futures.Future of its "
                    "result at once; the collective runs on the ring's loop thread.")
    return call


class BlockingRing:
    """A Ring for synchronous code; `ring.all_reduce(grad, op="mean")` blocks until done."""

    def __init__(self, ring: Ring, thread: LoopThread) -> None:
        self.ring = ring
        self._thread = thread
        self._callers = _Callers(lambda: self.ring.rank)
        self.local_rank = ring.local_rank
        atexit.register(self.close)
        # Here, on the caller's thread: the ring was made on the loop's.
        signals.install(timeline=ring.timeline is not None)

    # reform() and admit() change these, so they are read from the ring each time.
    rank = property(lambda self: self.ring.rank, doc="This rank's number in the ring.")
    world_size = property(lambda self: self.ring.world_size, doc="How many ranks the ring has.")
    peers = property(lambda self: self.ring.peers, doc="Every rank's address, in rank order.")
    address = property(lambda self: self.ring.address,
                       doc="The address this rank receives at (None in a ring of one).")
    generation = property(lambda self: self.ring.generation,
                          doc="How many times the ring's membership changed (reform, admit).")
    flight = property(lambda self: self.ring.flight,
                      doc="This rank's flight recorder: its last collectives (dump() them).")
    timeline = property(lambda self: self.ring.timeline,
                        doc="The timeline this rank records, if one is on.")

    def __repr__(self) -> str:
        return f"<BlockingRing rank {self.rank} of {self.world_size} at {self.ring.address}>"

    all_reduce = _blocking(Ring.all_reduce, Ring._start_all_reduce)
    reduce_scatter = _blocking(Ring.reduce_scatter, Ring._start_reduce_scatter)
    all_gather = _blocking(Ring.all_gather, Ring._start_all_gather)
    broadcast = _blocking(Ring.broadcast, Ring._start_broadcast)
    barrier = _blocking(Ring.barrier, Ring._start_barrier)
    send = _blocking(Ring.send)
    recv = _blocking(Ring.recv)
    reform = _blocking(Ring.reform)
    _grow = _blocking(Ring._grow)

    def admit(self, *, timeout: float | None = None) -> int:
        """Let in the newcomers waiting, and return how many joined (see Ring.admit). Its
        first step, an all-reduce of the count, runs here as any small one does, so that
        admit() costs no more than that when nobody waits."""
        mine = self.ring._asked()
        most = int(self.all_reduce(np.array([len(mine)], np.int64), op="max",
                                   timeout=timeout)[0])
        return self._grow(mine, most, timeout=timeout) if most else 0

    def waiting(self) -> int:
        """How many newcomers asked this member to be admitted (see Ring.waiting)."""
        return self.ring.waiting()

    _start_timeline = _blocking(Ring.start_timeline)

    def start_timeline(self, path: str) -> None:
        """Record this rank's timeline to `path` from now on (see Ring.start_timeline)."""
        self._start_timeline(path)
        signals.install(timeline=True)

    def stop_timeline(self) -> None:
        """Stop recording the timeline, and write its file a last time."""
        self.ring.stop_timeline()
    # Started at once, finished in the background: the calling thread keeps working (the
    # gradient averager overlaps backward this way). Issue order is collective order.
    all_reduce_async = _nowait(Ring.all_reduce)
    reduce_scatter_async = _nowait(Ring.reduce_scatter)
    all_gather_async = _nowait(Ring.all_gather)
    broadcast_async = _nowait(Ring.broadcast)
    barrier_async = _nowait(Ring.barrier)
    send_async = _nowait(Ring.send)
    recv_async = _nowait(Ring.recv)

    def _loop_thread(self) -> LoopThread:
        if self._thread is None:
            raise RingClosed(f"rank {self.rank}: the ring is closed")
        return self._thread

    def close(self) -> None:
        """Leave the ring and stop the loop thread. Idempotent; also runs at interpreter exit."""
        atexit.unregister(self.close)
        if self._thread is None:
            return
        thread, self._thread = self._thread, None
        try:
            thread.run(self.ring.close())
        finally:
            thread.stop()

    def __enter__(self) -> BlockingRing:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def init(rank: int | None = None, world_size: int | None = None,
         peers: list[str] | None = None, *, timeout: float | None = None,
         **settings: Any) -> BlockingRing:
    """Join the ring from synchronous code; the arguments are connect()'s (join= among
    them, for a newcomer to a running ring)."""
    where = connect(rank, world_size, peers, timeout=timeout, **settings)
    thread = LoopThread("ringlib-loop")
    try:
        ring = thread.run(_await(where))
    except BaseException:
        thread.stop()
        raise
    return BlockingRing(ring, thread)


async def _await(connecting: Any) -> Ring:
    return await connecting
