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

Losing a stage: a Pipeline given `build` (each rank's stage for any ring size) survives
the loss of any rank but 0. Every survivor meets PeerLost on its stream, re-forms the ring
(Ring.reform), builds its stage of the smaller ring, and opens a new stream; rank 0 says
from which micro-batch on the stream resumes (the first whose output it has not got),
and re-sends those micro-batches from their inputs, which it keeps until their outputs
come. So run() yields every output once, in order; close() sends its word to stop
round the smaller ring the same way, and every rank waits in a barrier until all have it,
so that none has left when a loss strikes. Without `build`, PeerLost is raised, naming
the stage. Newcomers waiting to join are not let in by that re-form (they would
run no stage of this pipeline): they wait for the members' next admit(), after which a
new Pipeline built on every rank takes them in.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, AsyncIterable, AsyncIterator, Callable, Iterable, Iterator, NamedTuple

import msgpack
import numpy as np

from ringlib.errors import CollectiveTimeout, InvalidArgument, PeerLost, RingClosed, StageError
from ringlib.transport.shared import discard

from .activations import Activation, join, owned, pack, split, unpack
from .blocking import BlockingRing
from .ring import Ring
from .sources import Source
from .stages import as_stage
from .timeline import PIPELINE

INLINE_S = 0.02  # a stage faster than this runs on the event loop's thread


class _Lost(NamedTuple):
    """The feeder met PeerLost in ring generation `generation`."""
    error: PeerLost
    generation: int


class Pipeline:
    """One rank's stage in a pipeline over `ring` (a Ring, or the BlockingRing of init()).

    stage: a torch module, an ONNX model path, or any callable on activations.
    build: instead of `stage`, build(rank, world_size) gives this rank's stage in a ring
        of world_size ranks (say a cut of a model every rank can make); then the pipeline
        survives losing a stage, re-split over the survivors.
    micro_batch: rows per micro-batch. max_in_flight: micro-batches in the pipe at once.
    timeout: seconds rank 0 waits for an output before it gives up on the other stages,
        and the survivors of a loss wait for each other.
    """

    def __init__(self, ring: Ring | BlockingRing, stage: Any = None, micro_batch: int = 8,
                 max_in_flight: int = 4, timeout: float = 60.0, *,
                 build: Callable[[int, int], Any] | None = None) -> None:
        if (stage is None) == (build is None):
            raise InvalidArgument("a Pipeline takes a stage, or build(rank, world_size) "
                                  "that makes one: exactly one of them")
        self._blocking = ring if isinstance(ring, BlockingRing) else None
        self.ring: Ring = ring.ring if self._blocking else ring
        self._build = build
        self.micro_batch, self.max_in_flight, self.timeout = micro_batch, max_in_flight, timeout
        self._take_places()
        self.stage = as_stage(stage if build is None else build(self.rank, self.world_size))
        self._worker = ThreadPoolExecutor(1, thread_name_prefix=f"ringlib-stage{self.rank}")
        self._sent = 0        # rank 0: micro-batch ids sent so far; others: ids handled
        self._received = 0    # rank 0: outputs received so far
        self._planned = 0     # rank 0: ids given to micro-batches so far
        self._inputs: dict[int, tuple[int, Activation]] = {}  # rank 0: id -> (batch, input)
        self._local: dict[int, asyncio.Future] = {}  # a ring of one: outputs by id
        self._inline = False  # whether the last micro-batch took less than INLINE_S
        self._feeder: asyncio.Future | None = None
        self._closed = False

    def _take_places(self) -> None:
        """This rank's place in the ring, its neighbours and a stream of its own."""
        self.rank, self.world_size = self.ring.rank, self.ring.world_size
        self._left = (self.rank - 1) % self.world_size
        self._right = (self.rank + 1) % self.world_size
        self._stream = self.ring.new_stream()

    # --- rank 0 ----------------------------------------------------------------------

    async def arun(self, batches: Iterable[Activation] | AsyncIterable[Activation], *,
                   return_exceptions: bool = False) -> AsyncIterator[Activation | StageError]:
        """The outputs of `batches` (an iterable, or an async one), in input order. A
        batch that a stage failed on raises StageError (or is yielded as one with
        return_exceptions); the pipeline serves on."""
        self._check_head()
        await self._drain()
        plan: asyncio.Queue = asyncio.Queue()
        slots = asyncio.Semaphore(self.max_in_flight)
        source = Source(batches)
        self._feeder = asyncio.ensure_future(self._feed(source, plan, slots))
        try:
            while (item := await plan.get()) is not None:
                if isinstance(item, _Lost):
                    if item.generation == self.ring.generation:  # not recovered from yet
                        await self._recover(item.error, source, plan, slots)
                    continue
                if isinstance(item, Exception):  # the feeder failed: a bad batch, say
                    raise item
                batch, ids = item
                parts, held = [], []
                for i in ids:
                    while True:
                        try:
                            part, payloads = await self._collect(i, batch, slots)
                            break
                        except PeerLost as exc:
                            await self._recover(exc, source, plan, slots)
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
            await self._feeder
        finally:
            await self._stop_feeder()
            source.close()

    async def _stop_feeder(self) -> None:
        if self._feeder is not None:
            self._feeder.cancel()
            await asyncio.gather(self._feeder, return_exceptions=True)
            self._feeder = None

    async def _feed(self, source: Source, plan: asyncio.Queue,
                    slots: asyncio.Semaphore) -> None:
        try:
            await self._feed_all(source, plan, slots)
        except PeerLost as exc:
            await plan.put(_Lost(exc, self.ring.generation))
            return
        except Exception as exc:
            await plan.put(exc)
            return
        await plan.put(None)

    async def _feed_all(self, source: Source, plan: asyncio.Queue,
                        slots: asyncio.Semaphore) -> None:
        await self._send_planned(slots)  # what a loss interrupted
        while (numbered := await source.next()) is not None:
            batch, whole = numbered
            micro = split(whole, self.micro_batch)
            ids = list(range(self._planned, self._planned + len(micro)))
            self._planned += len(micro)
            self._inputs.update((i, (batch, part)) for i, part in zip(ids, micro))
            await plan.put((batch, ids))
            await self._send_planned(slots)

    async def _send_planned(self, slots: asyncio.Semaphore) -> None:
        """Run stage 0 on every micro-batch given an id but not sent yet, and send it."""
        while self._sent < self._planned:
            i = self._sent
            await slots.acquire()
            result = await self._compute(i, *self._inputs[i])
            self._sent = i + 1
            # Once id i is taken it must go out whole, even if this run is abandoned:
            # the next run drains its output.
            await asyncio.shield(self._send(i, *result))

    async def _recover(self, lost: PeerLost, source: Source,
                       plan: asyncio.Queue, slots: asyncio.Semaphore) -> None:
        """Rank 0, after `lost`: re-form with the survivors, re-send every micro-batch
        whose output had not come, and feed on from where the batches were."""
        await self._stop_feeder()
        while True:
            await self._reform(lost)
            try:
                for i in range(self._received, self._sent):
                    await self._send(i, *await self._compute(i, *self._inputs[i]))
                break
            except PeerLost as again:
                lost = again
        self._feeder = asyncio.ensure_future(self._feed(source, plan, slots))

    async def _collect(self, i: int, batch: int, slots: asyncio.Semaphore
                       ) -> tuple[Activation | StageError, list]:
        """Micro-batch `i`'s output (or the error a stage met), and the payloads it lies on."""
        try:
            async with asyncio.timeout(self.timeout):  # wait_for would make a task of it
                meta, act, held = await self._receive(i)
        except TimeoutError:
            raise CollectiveTimeout(
                f"pipeline on rank 0: no output for batch {batch} (micro-batch {i}) within "
                f"{self.timeout:g} s; a stage on ranks 1..{self.world_size - 1} "
                f"({', '.join(self.ring.peers[1:])}) may have died or hung") from None
        self._received = i + 1
        del self._inputs[i]
        slots.release()
        if meta.get("error"):
            return StageError(meta["error"], meta["rank"], batch), held
        return act, held

    async def _drain(self) -> None:
        """Receive and drop the outputs of micro-batches still in the pipe from an earlier
        run that stopped early, so that ids line up again. A loss meanwhile: nobody wants
        those outputs, so the re-formed pipeline resumes after them."""
        for i in range(self._sent, self._planned):  # given ids but never sent
            del self._inputs[i]
        self._planned = self._sent
        while self._received < self._sent:
            try:
                async with asyncio.timeout(self.timeout):
                    held = (await self._receive(self._received))[2]
            except PeerLost as exc:
                for i in range(self._received, self._sent):
                    del self._inputs[i]
                self._received = self._sent
                await self._reform(exc)
                return
            for payload in held:
                discard(payload)
            del self._inputs[self._received]
            self._received += 1

    async def aclose(self) -> None:
        """Rank 0: tell every stage to stop, and wait until the word has gone round and
        every rank has it (a barrier). A stage lost meanwhile, with `build`: the
        survivors re-form, and the word goes round the smaller ring."""
        if self._closed:
            return
        self._check_head()
        await self._drain()
        while self.world_size > 1:
            try:
                await self._send(self._sent, {"stop": True}, None)
                await asyncio.wait_for(self._receive(self._sent), self.timeout)
                await self.ring.barrier(timeout=self.timeout)
                break
            except PeerLost as exc:
                await self._reform(exc)
        self._finish()

    # --- the other ranks --------------------------------------------------------------

    async def aserve(self) -> None:
        """Run this rank's stage on everything that arrives, until rank 0 closes."""
        if self.rank == 0:
            raise RingClosed("rank 0 drives the pipeline with run(); the others serve()")
        while True:
            try:
                stop = await self._serve_one()
                if stop:  # stay until every rank has the word, so that a loss now is
                    await self.ring.barrier(timeout=self.timeout)  # met by them all
            except PeerLost as exc:
                await self._reform(exc)
                continue
            if stop:
                self._finish()
                return

    async def _serve_one(self) -> bool:
        """Take the next micro-batch from the left, pass its output right; whether it
        was the word to stop."""
        meta, act, held = await self._receive(self._sent)
        if meta.get("stop") or meta.get("error"):
            await self._send(self._sent, meta, None)
        else:
            meta, out = await self._compute(self._sent, meta["batch"], act)
            await self._send(self._sent, meta, owned(out, act) if held else out)
        for payload in held:
            discard(payload)
        self._sent += 1
        return bool(meta.get("stop"))

    async def _reform(self, lost: PeerLost) -> None:
        """After `lost`, with `build`: re-form the ring with the survivors, build this
        rank's stage of it, open a new stream, and agree on the micro-batch it resumes
        from (rank 0's first missing output). Without `build`, or with rank 0 lost,
        raise PeerLost naming the stage."""
        if self._build is None or (lost.rank == 0 and self.rank != 0):
            what = ("the pipeline's head" if lost.rank == 0 else
                    f"the stage on rank {lost.rank} ({lost.address})")
            hint = "" if lost.rank == 0 else \
                "; Pipeline(build=...) re-splits the model over the survivors"
            raise PeerLost(f"pipeline on rank {self.rank}: {what} was lost{hint}: {lost}",
                           lost.rank, lost.address) from lost
        await self.ring.reform(timeout=self.timeout, admit=False)
        self._take_places()
        self.stage = as_stage(self._build(self.rank, self.world_size))
        self._inline = False
        start = np.array([self._received], np.int64)
        await self.ring.broadcast(start, root=0)
        if self.rank != 0:
            self._sent = int(start[0])

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
        await self._stream.send(self._right, i, 0, msgpack.packb(meta), held=True)
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
        description = (await self._stream.recv(self._left, i, 0)).payload
        meta = msgpack.unpackb(description.buffer)
        discard(description)
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
