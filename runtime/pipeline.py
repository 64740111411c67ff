"""Pipeline-parallel inference: stage i on rank i, micro-batches flowing around the ring.

Rank 0 cuts each batch into micro-batches, runs stage 0 on them and sends them right;
each rank runs its stage on what arrives from the left and passes it on; the last rank
sends the outputs over the ring's closing link back to rank 0, which puts every batch
back together and yields the batches in input order. At most `max_in_flight`
micro-batches are between rank 0's send and its receive, so no stage's inbox grows
without bound.

A stage whose last micro-batch took less than INLINE_S runs on the event loop's thread:
two thread hops a micro-batch cost more than they overlap (bench pipeline measured 25%
of a 2-stage pipeline's throughput on 4 ms stages); a slower one runs in a worker
thread, so that the loop goes on moving messages and heartbeats meanwhile.

A micro-batch travels as one item of the pipeline's stream (transport/streams.py; pipelines
on one ring never mix), numbered by a running micro-batch id: part 0 is a msgpack
description (batch index, structure, dtypes, shapes, or an error, or stop), parts 1..
are the tensors' bytes, sent without copying over the sockets or copied once into the
shared-memory link to a neighbour on this host, whose stage reads its input in place
there and releases it once its output is sent (an output that is a view of its input is
copied out first).
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, AsyncIterator, Iterable, Iterator

import msgpack

from ringlib.errors import CollectiveTimeout, RingClosed, StageError

from ringlib.transport.shared import discard

from .activations import Activation, join, owned, pack, split, unpack
from .blocking import BlockingRing
from .ring import Ring
from .stages import as_stage
from .timeline import PIPELINE

INLINE_S = 0.02  # a stage faster than this runs on the event loop's thread


class Pipeline:
    """One rank's stage in a pipeline over `ring` (a Ring, or the BlockingRing of init()).

    stage: a torch module, an ONNX model path, or any callable on activations.
    micro_batch: rows per micro-batch. max_in_flight: micro-batches in the pipe at once.
    timeout: seconds rank 0 waits for an output before it gives up on the other stages.
    """

    def __init__(self, ring: Ring | BlockingRing, stage: Any, micro_batch: int = 8,
                 max_in_flight: int = 4, timeout: float = 60.0) -> None:
        self._blocking = ring if isinstance(ring, BlockingRing) else None
        self.ring: Ring = ring.ring if self._blocking else ring
        self.stage = as_stage(stage)
        self.micro_batch, self.max_in_flight, self.timeout = micro_batch, max_in_flight, timeout
        self.rank, self.world_size = self.ring.rank, self.ring.world_size
        self._left = (self.rank - 1) % self.world_size
        self._right = (self.rank + 1) % self.world_size
        self._stream = self.ring.new_stream()
        self._worker = ThreadPoolExecutor(1, thread_name_prefix=f"ringlib-stage{self.rank}")
        self._sent = 0        # rank 0: micro-batch ids sent so far; others: ids handled
        self._received = 0    # rank 0: outputs received so far
        self._local: dict[int, asyncio.Future] = {}  # a ring of one: outputs by id
        self._inline = False  # whether the last micro-batch took less than INLINE_S
        self._closed = False

    # --- rank 0 ----------------------------------------------------------------------

    async def arun(self, batches: Iterable[Activation], *,
                   return_exceptions: bool = False) -> AsyncIterator[Activation | StageError]:
        """The outputs of `batches`, in input order. A batch that a stage failed on raises
        StageError (or is yielded as one with return_exceptions); the pipeline serves on."""
        self._check_head()
        await self._drain()
        plan: asyncio.Queue = asyncio.Queue()
        slots = asyncio.Semaphore(self.max_in_flight)
        feeder = asyncio.ensure_future(self._feed(batches, plan, slots))
        try:
            while (item := await plan.get()) is not None:
                if isinstance(item, Exception):  # the feeder failed: a bad batch, say
                    raise item
                batch, ids = item
                parts, held = [], []
                for i in ids:
                    part, payloads = await self._collect(i, batch, slots)
                    parts.append(part)
                    held += payloads
                failed = next((p for p in parts if isinstance(p, StageError)), None)
                output = join(parts) if failed is None else None  # a copy: let go of the rest
                for payload in held:
                    discard(payload)
                if failed is None:
                    yield output
                elif return_exceptions:
                    yield failed
                else:
                    raise failed
            await feeder
        finally:
            feeder.cancel()
            await asyncio.gather(feeder, return_exceptions=True)

    async def _feed(self, batches: Iterable[Activation], plan: asyncio.Queue,
                    slots: asyncio.Semaphore) -> None:
        try:
            await self._feed_all(batches, plan, slots)
        except Exception as exc:
            await plan.put(exc)
            return
        await plan.put(None)

    async def _feed_all(self, batches: Iterable[Activation], plan: asyncio.Queue,
                        slots: asyncio.Semaphore) -> None:
        for batch, whole in enumerate(batches):
            micro = split(whole, self.micro_batch)
            ids = list(range(self._sent, self._sent + len(micro)))
            await plan.put((batch, ids))
            for i, part in zip(ids, micro):
                await slots.acquire()
                result = await self._compute(i, batch, part)
                self._sent = i + 1
                # Once id i is taken it must go out whole, even if this run is abandoned:
                # the next run drains its output.
                await asyncio.shield(self._send(i, *result))

    async def _collect(self, i: int, batch: int, slots: asyncio.Semaphore
                       ) -> tuple[Activation | StageError, list]:
        """Micro-batch `i`'s output (or the error a stage met), and the payloads it lies on."""
        try:
            meta, act, held = await asyncio.wait_for(self._receive(i), self.timeout)
        except TimeoutError:
            raise CollectiveTimeout(
                f"pipeline on rank 0: no output for batch {batch} (micro-batch {i}) within "
                f"{self.timeout:g} s; a stage on ranks 1..{self.world_size - 1} "
                f"({', '.join(self.ring.peers[1:])}) may have died or hung") from None
        self._received = i + 1
        slots.release()
        if meta.get("error"):
            return StageError(meta["error"], meta["rank"], batch), held
        return act, held

    async def _drain(self) -> None:
        """Receive and drop the outputs of micro-batches still in the pipe from an earlier
        run that stopped early, so that ids line up again."""
        while self._received < self._sent:
            for payload in (await asyncio.wait_for(self._receive(self._received), self.timeout))[2]:
                discard(payload)
            self._received += 1

    async def aclose(self) -> None:
        """Rank 0: tell every stage to stop, and wait until the word has gone round."""
        if self._closed:
            return
        self._check_head()
        await self._drain()
        if self.world_size > 1:
            await self._send(self._sent, {"stop": True}, None)
            await asyncio.wait_for(self._receive(self._sent), self.timeout)
        self._finish()

    # --- the other ranks --------------------------------------------------------------

    async def aserve(self) -> None:
        """Run this rank's stage on everything that arrives, until rank 0 closes."""
        if self.rank == 0:
            raise RingClosed("rank 0 drives the pipeline with run(); the others serve()")
        while True:
            meta, act, held = await self._receive(self._sent)
            if meta.get("stop") or meta.get("error"):
                await self._send(self._sent, meta, None)
            else:
                meta, out = await self._compute(self._sent, meta["batch"], act)
                await self._send(self._sent, meta, owned(out, act) if held else out)
            for payload in held:
                discard(payload)
            self._sent += 1
            if meta.get("stop"):
                self._finish()
                return

    # --- both ----------------------------------------------------------------------

    async def _compute(self, i: int, batch: int,
                       act: Activation) -> tuple[dict, Activation | None]:
        """(description, output) of this rank's stage on micro-batch `i`, `act`, or an
        error description."""
        began = time.monotonic_ns()
        try:
            if self._inline:
                out = self.stage(act)
            else:
                out = await asyncio.get_running_loop().run_in_executor(self._worker, self.stage, act)
        except Exception as exc:
            message = f"stage on rank {self.rank} failed on batch {batch}: {type(exc).__name__}: {exc}"
            return {"batch": batch, "error": message, "rank": self.rank}, None
        finally:
            self._inline = time.monotonic_ns() - began < INLINE_S * 1e9
            self._record("compute", i, began, batch=batch)
        return {"batch": batch}, out

    def _record(self, what: str, i: int, began: int, flow: str = "", **args: Any) -> None:
        """Put a span of micro-batch `i` on the timeline, where one is on; with `flow`
        ("out" or "in"), one end of the arrow between this stage and its neighbour."""
        timeline = self.ring.timeline
        if timeline is None:
            return
        ended = time.monotonic_ns()
        tid = PIPELINE + (self._stream.number if self._stream else 0)
        timeline.span(f"{what} #{i}", tid, began, ended, {"micro-batch": i, **args})
        if flow:
            sender = self.rank if flow == "out" else self._left
            timeline.flow("micro-batch", f"{self._stream.number}.{i}.{sender}", flow == "out",
                          tid, (began + ended) // 2)
        if self.rank == 0:
            timeline.counter("micro-batches in flight", self._sent - self._received)

    async def _send(self, i: int, meta: dict, act: Activation | None) -> None:
        if self.world_size == 1:
            self._local_output(i).set_result((meta, act))
            return
        buffers: list = []
        began = time.monotonic_ns()
        if act is not None:
            description, buffers = pack(act)
            meta = {**meta, **description}
        await self._stream.send(self._right, i, 0, msgpack.packb(meta))
        for part, buffer in enumerate(buffers, start=1):
            await self._stream.send(self._right, i, part, buffer, "uint8", held=True)
        self._record("send", i, began, "out", to=self._right)

    async def _receive(self, i: int) -> tuple[dict, Activation | None, list]:
        """Micro-batch `i` from the left: its description, its activation, and the
        payloads that activation lies on, to discard() once done with it."""
        if self.world_size == 1:
            result = await self._local_output(i)
            del self._local[i]
            return (*result, [])
        began = time.monotonic_ns()
        meta = msgpack.unpackb((await self._stream.recv(self._left, i, 0)).payload.bytes)
        held = [(await self._stream.recv(self._left, i, part)).payload
                for part in range(1, len(meta.get("dtypes", ())) + 1)]
        self._record("wait for input", i, began, "in", frm=self._left)
        act = unpack(meta, [p.buffer for p in held]) if "dtypes" in meta else None
        return meta, act, held

    def _local_output(self, i: int) -> asyncio.Future:
        if i not in self._local:
            self._local[i] = asyncio.get_running_loop().create_future()
        return self._local[i]

    def _check_head(self) -> None:
        if self.rank != 0:
            raise RingClosed(f"rank {self.rank} serves the pipeline; only rank 0 runs batches")
        if self._closed:
            raise RingClosed("the pipeline is closed")

    def _finish(self) -> None:
        self._closed = True
        self._worker.shutdown(wait=False)

    # --- the blocking facade -----------------------------------------------------------

    def run(self, batches: Iterable[Activation], *,
            return_exceptions: bool = False) -> Iterator[Activation | StageError]:
        """arun() for synchronous code (the pipeline's ring came from ringlib.init())."""
        thread = self._loop_thread()
        outputs = self.arun(batches, return_exceptions=return_exceptions)
        try:
            while True:
                try:
                    yield thread.run(outputs.__anext__())
                except StopAsyncIteration:
                    return
        finally:
            thread.run(outputs.aclose())

    def serve(self) -> None:
        """aserve() for synchronous code: returns when rank 0 closes the pipeline."""
        self._loop_thread().run(self.aserve())

    def close(self) -> None:
        """aclose() for synchronous code."""
        self._loop_thread().run(self.aclose())

    def _loop_thread(self) -> Any:
        if self._blocking is None:
            raise RingClosed("run(), serve() and close() need the ring from ringlib.init(); "
                             "with ringlib.connect(), use arun(), aserve() and aclose()")
        return self._blocking._loop_thread()
