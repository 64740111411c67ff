"""Serving: requests that arrive over time, on rank 0 of a pipeline kept open.

Each request is an activation whose first dimension counts its rows. Requests are gathered
into a batch (dynamic micro-batching, as inference servers do) until it holds `max_rows`
rows, or `max_wait` seconds passed since its first request came, whichever is first; the
batch goes through the pipeline (Pipeline.arun over an async source, so batches follow
each other through the stages without waiting for the one before), and each request gets
its own rows of the output. Results come back in arrival order; every request's latency,
from submit to result, is kept (the newest KEPT).

    serving = Serving(pipe, max_rows=32, max_wait=0.002)     # rank 0
    y = serving.submit(x).result()                           # any thread; blocking ring
    y = await serving.asubmit(x)                             # asyncio
    serving.close()                                          # then pipe.close()
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import time
from typing import AsyncIterator, NamedTuple

from ringlib.errors import InvalidArgument, RingClosed, StageError

from .activations import Activation, count_rows, join, split
from .pipeline import Pipeline

KEPT = 100_000  # latencies kept


class _Request(NamedTuple):
    activation: Activation
    rows: int
    future: asyncio.Future
    arrived: float


class Serving:
    """Rank 0's front door to `pipe`: requests in, each one's result out."""

    def __init__(self, pipe: Pipeline, max_rows: int | None = None,
                 max_wait: float = 0.002) -> None:
        if pipe.rank != 0:
            raise RingClosed(f"rank {pipe.rank} serves the pipeline; requests go to rank 0")
        if max_rows is not None and max_rows < 1 or max_wait < 0:
            raise InvalidArgument(f"max_rows must be 1 or more and max_wait 0 or more, not "
                                  f"{max_rows} and {max_wait}")
        self.pipe = pipe
        self.max_rows, self.max_wait = max_rows or pipe.micro_batch, max_wait
        self.latencies: collections.deque[float] = collections.deque(maxlen=KEPT)
        self._queue: asyncio.Queue | None = None
        self._groups: collections.deque[list[_Request]] = collections.deque()
        self._task: asyncio.Future | None = None
        self._failure: BaseException | None = None
        self._closing = False

    async def asubmit(self, request: Activation) -> Activation:
        """The pipeline's output for `request` (its rows, in order)."""
        if self._failure is not None:
            raise self._failure
        if self._closing:
            raise RingClosed("the serving is closed")
        rows = count_rows(request)
        if self._task is None:
            self._queue = asyncio.Queue()
            self._task = asyncio.ensure_future(self._run())
        future = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Request(request, rows, future, time.perf_counter()))
        return await future

    def submit(self, request: Activation) -> concurrent.futures.Future:
        """asubmit() from any thread, on a pipeline whose ring came from ringlib.init()."""
        return self.pipe._loop_thread().submit(self.asubmit(request))

    async def aclose(self) -> None:
        """Finish the requests already submitted, then stop taking more."""
        self._closing = True
        if self._task is not None:
            self._queue.put_nowait(None)
            await asyncio.gather(self._task, return_exceptions=True)

    def close(self) -> None:
        """aclose() for synchronous code."""
        self.pipe._loop_thread().run(self.aclose())

    async def _run(self) -> None:
        try:
            async for out in self.pipe.arun(self._batches(), return_exceptions=True):
                self._answer(self._groups.popleft(), out)
        except BaseException as exc:  # the pipeline failed: so do the requests waiting
            self._failure = exc
            for request in [r for group in self._groups for r in group] + self._left():
                if not request.future.done():
                    request.future.set_exception(exc)
            raise

    async def _batches(self) -> AsyncIterator[Activation]:
        """The gathered batches, as requests come, until aclose()."""
        while (group := await self._gather()) is not None:
            try:
                batch = join([r.activation for r in group])
            except (RuntimeError, InvalidArgument) as exc:  # requests that do not stack
                for r in group:
                    r.future.set_exception(InvalidArgument(f"requests batched together "
                                                           f"differ: {exc}"))
                continue
            self._groups.append(group)
            yield batch

    async def _gather(self) -> list[_Request] | None:
        """The next batch's requests: the first to come, then those that come within
        max_wait of it, up to max_rows rows; None once closed and nothing is left."""
        first = await self._queue.get()
        if first is None:
            return None
        group, rows = [first], first.rows
        deadline = asyncio.get_running_loop().time() + self.max_wait
        while rows < self.max_rows:
            left = deadline - asyncio.get_running_loop().time()
            try:
                request = (self._queue.get_nowait() if left <= 0 else
                           await asyncio.wait_for(self._queue.get(), left))
            except (asyncio.QueueEmpty, TimeoutError):
                break
            if request is None:  # closing: what is gathered still goes
                self._queue.put_nowait(None)
                break
            group.append(request)
            rows += request.rows
        return group

    def _answer(self, group: list[_Request], out: Activation | StageError) -> None:
        """Give each request of `group` its rows of `out`, or the error."""
        if not isinstance(out, StageError):
            wanted = [r.rows for r in group]
            try:
                pieces = split(out, wanted)
            except (RuntimeError, InvalidArgument) as exc:
                out = StageError(f"the pipeline's output does not split into its requests' "
                                 f"{sum(wanted)} rows: {exc}", 0, -1)
        now = time.perf_counter()
        for i, request in enumerate(group):
            if request.future.done():  # its submitter went away
                continue
            if isinstance(out, StageError):
                request.future.set_exception(out)
            else:
                request.future.set_result(pieces[i])
            self.latencies.append(now - request.arrived)

    def _left(self) -> list[_Request]:
        left = []
        while self._queue is not None and not self._queue.empty():
            item = self._queue.get_nowait()
            if item is not None:
                left.append(item)
        return left

