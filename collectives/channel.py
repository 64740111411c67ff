"""What an algorithm sees of the network: send and receive pieces of one collective.

A Channel is made per collective call (session.py, which owns the collective's life). It
stamps every message with the collective's sequence number and signature, names the peers
in errors, keeps the trackers of buffers shared with ZeroMQ or lent by address, and runs
compiled kernels off the event loop when a piece is large enough to be worth the thread
hop.

Every wait that blocks is bounded by the collective's deadline. The timer is armed only
there: most messages of a small collective have arrived before they are asked for, and a
timer per call would cost more than the message.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections import defaultdict
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np

from ringlib.errors import PeerLost, ProtocolError
from ringlib.partition import sub_chunks
from ringlib.transport import Endpoint, Released, RemotePayload, discard, frames, held, wait_sent


@functools.lru_cache(maxsize=1024)
def signature(name: str, dtype: str = "", shape: tuple[int, ...] | None = None, op: str = "",
              root: int | None = None, algorithm: str = "", caller: str = "") -> str:
    """What a collective call is, as every rank must agree on it:
    'all_reduce float32[3,4] sum', 'broadcast int64[10] root=2', 'barrier'. An `algorithm`
    chosen by what a rank knows of its links (the pairwise all-reduce) is part of it, so
    that ranks that chose differently raise MismatchError instead of mixing steps; so is
    the `caller`, the thread that called a blocking ring's collective, if it is not the
    thread that made the ring."""
    parts = [name, "" if shape is None else f"{dtype}[{','.join(map(str, shape))}]", op,
             "" if root is None else f"root={root}", algorithm,
             f"thread={caller}" if caller else ""]
    return " ".join(p for p in parts if p)

# A receive that has waited this long asks its sender what it runs as this collective
# (WAITING, see session.py): ranks that called different collectives whose messages never
# meet (an all-reduce on some ranks, a broadcast on others) learn it then, not at the
# deadline.
PROBE_S = 0.5

# Pieces below this many bytes are reduced or copied on the event-loop thread, where they
# take tens of microseconds; a hop to the worker thread cost more than that up to 1 MiB
# (docs/benchmark-notes.md). Larger pieces go to the worker, and the loop keeps moving messages.
INLINE_BYTES = 1 << 20


@dataclass(slots=True)
class Channel:
    endpoint: Endpoint
    world_size: int
    seq: int
    name: str              # the collective, for error messages: "all_reduce"
    sig: str               # its signature(), stamped on every header and compared
    storage: np.dtype      # the element type as the kernels see it
    executor: Executor
    segment_elems: int     # the largest piece sent as one message
    deadline: float        # the event loop's time by which the collective must be done
    spin: float = 0.0      # seconds each receive polls before yielding (Endpoint.poll)
    sent: dict[Any, list] = field(default_factory=lambda: defaultdict(list))
    waiting_for: tuple[int, int] | None = None  # (peer, step), for timeout messages
    held: list = field(default_factory=list)  # received frames not yet released
    timeline: Any = None   # a runtime Timeline that records the phases, where one is on

    @property
    def rank(self) -> int:
        return self.endpoint.rank

    def pieces(self, bounds: list[int], c: int) -> list[tuple[int, int]]:
        """The [start, stop) ranges chunk `c` of `bounds` travels in, one message each."""
        return sub_chunks(bounds[c], bounds[c + 1], self.segment_elems)

    async def send(self, to: int, step: int, chunk: int, payload: Any, region: Any = None,
                   writable: bool = False) -> bool:
        """Send one piece. With `region`, the piece is a view of a buffer that this collective
        changes later: its tracker is kept under `region` for before_overwrite(). With
        `writable`, lend it to a peer that can reach this rank's memory, to write into
        until it releases it (see reduce_back); return whether it was lent so."""
        nbytes = payload.nbytes if isinstance(payload, np.ndarray) else len(payload)
        header = frames.data(self.seq, step, chunk, self.sig, self.rank, nbytes)
        began = self._now()
        tracker = await self.endpoint.send(to, header, payload, deadline=self.deadline,
                                           writable=writable)
        if began:
            self._phase("send", began, peer=to, step=step, bytes=nbytes)
        if region is not None and tracker is not None:
            self.sent[region].append(tracker)
        return writable and isinstance(tracker, Released)

    async def recv(self, frm: int, step: int, chunk: int, count: int) -> tuple[Any, Any]:
        """Receive one piece of `count` elements from rank `frm`: the piece, for run() and
        copy(), and the frame it came in, for forward() and release(). The piece is a
        read-only storage view (in ZeroMQ's buffer or the sender's shared memory), or, for a
        large piece from a peer on this host, the payload itself, still in the sender's
        memory (RemotePayload). Either is valid until release(frame)."""
        self.waiting_for = (frm, step)
        key = frames.data_key(self.seq, step, chunk, frm)
        began = self._now()
        message = self.endpoint.poll(key, self.spin)
        if message is None:
            probe = asyncio.get_running_loop().call_later(PROBE_S, self._probe, frm)
            try:
                async with asyncio.timeout_at(self.deadline):
                    message = await self.endpoint.recv(key)
            finally:
                probe.cancel()
        self.waiting_for = None
        if began:
            self._phase(f"wait for rank {frm}", began, peer=frm, step=step)
        header, frame = message
        self.held.append(frame)
        if header.nbytes != count * self.storage.itemsize:
            raise ProtocolError(
                f"{self.name} #{self.seq} on rank {self.rank}: rank {frm} "
                f"({self.endpoint.peer_addresses.get(frm)}) sent {header.nbytes} bytes at step "
                f"{step} where {count} elements of {self.storage} were expected")
        if isinstance(frame, RemotePayload):
            return frame, frame
        return np.frombuffer(frame.buffer, self.storage), frame

    def _now(self) -> int:
        """The clock where a timeline records this collective's phases, else 0."""
        return 0 if self.timeline is None else time.monotonic_ns()

    def _phase(self, name: str, began: int, **args: Any) -> None:
        self.timeline.phase(self.seq, name, began, time.monotonic_ns(), args)

    def _probe(self, frm: int) -> None:
        self.endpoint.notify(frm, frames.waiting(self.seq, self.rank), self.sig.encode())

    def release(self, frame: Any) -> None:
        """Done with a received piece: a shared-memory sender may write over it now."""
        self.held.remove(frame)
        discard(frame)

    def release_all(self) -> None:
        """Release every piece still held (the collective ended, or failed)."""
        for frame in self.held:
            discard(frame)
        self.held.clear()

    async def run(self, fn: Callable[..., None], out: np.ndarray, src: Any) -> None:
        """fn(out, src) for a received piece `src`, in the worker thread when it is large.
        A piece still in its sender's memory is read a block at a time into a buffer that
        the kernel then reads while it is in cache, on the event loop's thread: the worker
        is there so that ZeroMQ's thread can move bytes meanwhile, and here none move but
        these, which the kernel copies (measured: docs/benchmark-notes.md)."""
        began = self._now()
        if isinstance(src, RemotePayload):
            with self._reading_remote():
                _reduce_remote(fn, out, src)
        else:
            await self._work(out.nbytes, fn, out, src)
        if began:
            self._phase("reduce", began, bytes=out.nbytes)

    async def reduce_back(self, fn: Callable[..., None], out: np.ndarray, src: Any) -> bool:
        """fn(out, src), and where `src` is a piece lent writable in its sender's memory,
        write each reduced block back into it while it is in cache; return whether it was
        written back (else the sender needs the result some other way)."""
        if isinstance(src, RemotePayload) and src.writable:
            began = self._now()
            with self._reading_remote():
                _reduce_remote(fn, out, src, back=True)
            if began:
                self._phase("reduce", began, bytes=out.nbytes)
            return True
        await self.run(fn, out, src)
        return False

    async def copy(self, out: np.ndarray, src: Any) -> None:
        """Copy a received piece into `out`: straight out of its sender's memory if it is
        still there."""
        began = self._now()
        if isinstance(src, RemotePayload):
            with self._reading_remote():
                src.read_into(out)
        else:
            await self._work(out.nbytes, np.copyto, out, src)
        if began:
            self._phase("copy", began, bytes=out.nbytes)

    @contextlib.contextmanager
    def _reading_remote(self) -> Iterator[None]:
        """A read of a payload in its sender's memory. A sender whose memory cannot be read
        is lost to the whole ring, every rank told, as when the watchdog finds one silent:
        a rank that waits on it elsewhere, and never watches it, learns at once."""
        try:
            yield
        except PeerLost as exc:
            self.endpoint.lose(exc.rank, "died: its memory can no longer be read")
            raise

    async def forward(self, to: int, step: int, chunk: int, frame: Any, copied: np.ndarray,
                      region: Any) -> None:
        """Pass a received piece on to `to`: the very ZeroMQ frame, which needs no tracker,
        or, for a piece held in shared memory, `copied`, the part of this rank's buffer it
        was copied into."""
        if held(frame):
            await self.send(to, step, chunk, copied, region=region)
        else:
            await self.send(to, step, chunk, frame)

    async def _work(self, nbytes: int, fn: Callable[..., None], *args: Any) -> None:
        if nbytes < INLINE_BYTES:
            fn(*args)
        else:
            async with asyncio.timeout_at(self.deadline):
                await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    async def before_overwrite(self, region: Any) -> None:
        """Wait until ZeroMQ has sent every piece of `region` shared with it."""
        trackers = self.sent.pop(region, ())
        if trackers:
            async with asyncio.timeout_at(self.deadline):
                await wait_sent(trackers, self.endpoint.inbox)

    async def withdraw(self, limit: float) -> None:
        """After a failure: wait up to `limit` seconds until the peers released what they
        may still read or write in this rank's buffers by address, so that none touches
        them after the collective raised. A peer that failed too releases at once."""
        lent = [t for trackers in self.sent.values() for t in trackers
                if isinstance(t, Released)]
        if lent:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(limit):
                    await wait_sent(lent)

    async def drain(self) -> None:
        """Wait until every buffer shared with ZeroMQ has left, or been read by a peer, so
        the caller may change it (at the end of every collective: Session.run)."""
        for region in list(self.sent):
            await self.before_overwrite(region)


# Blocks a remote piece is read in before they are reduced: small enough to stay in cache,
# large enough that the system call and kernel launch per block cost little (measured
# 64 KiB to 2 MiB: docs/benchmark-notes.md).
REMOTE_BLOCK_BYTES = 512 << 10


def _reduce_remote(fn: Callable[..., None], out: np.ndarray, src: RemotePayload,
                   back: bool = False) -> None:
    """fn(out, src) for a piece that lies in another process, one cache-sized block at a
    time: block i of src is read (single_copy.py) into `scratch`, then reduced into out,
    and with `back` the reduced block is written over block i of src."""
    step = max(1, REMOTE_BLOCK_BYTES // out.itemsize)
    scratch = np.empty(min(step, out.size), out.dtype)
    for start in range(0, out.size, step):
        block, done = scratch[:min(step, out.size - start)], out[start:start + step]
        src.read_into(block, start * out.itemsize)
        fn(done, block)
        if back:
            src.write_from(done, start * out.itemsize)
