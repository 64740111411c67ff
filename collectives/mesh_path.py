"""The mesh path: all-reduces and barriers of a ring without a shared arena (ranks on
several hosts, or shared memory off) run over the mesh (transport/mesh.py) by the thread
that calls them, with no message through ZeroMQ, no Channel and no hop between threads.

Small ones are exchanged all to all (mesh_all_to_all.py), large all-reduces streamed
round the ring (mesh_ring_allreduce.py); MeshPending runs either to its end. A MeshPath
numbers its collectives with the ring's Sessions, in call order with the collectives
that take messages, and runs its own one at a time in that order.

Off the event loop's thread (a blocking ring's caller) a collective waits in poll(2) on
the mesh's sockets, in slices between which it checks what ends a wait early: a lost
peer, another rank's word that the ranks called different collectives, the deadline, or
a Ctrl-C. On the loop it waits with add_reader, and the loop goes on meanwhile. Frames
carry a hash of the collective's signature, so ranks that call different collectives
raise MismatchError on every rank; a rank that ran it with messages instead (its
settings differ) is found by its WAITING questions, through Sessions.
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any, Callable, NamedTuple, Protocol

import numpy as np

from ringlib.dtypes import DType
from ringlib.errors import CollectiveTimeout, MismatchError, ProtocolError, RingClosed
from ringlib.transport import Endpoint
from ringlib.transport.mesh import Link, LinkBroken, Mesh, wait_here, wait_on_loop

from .compiled import signature_hash
from .mesh_all_to_all import AllToAll
from .mesh_ring_allreduce import PIECE_BYTES, RingStream
from .ring_reduce_scatter import Reducer
from .session import THREADS, Sessions, tell_everyone

SLICE_S = 0.01  # how long a wait sleeps at most before it looks at what may end it


class Exchange(Protocol):
    """How one mesh collective moves and reduces its data (mesh_all_to_all.py,
    mesh_ring_allreduce.py)."""

    def begin(self, seq: int, sig_hash: int) -> None: ...
    def progress(self, seq: int) -> bool: ...
    def waits(self) -> list[tuple[Link, bool, bool]]: ...
    def waiting_on(self) -> int | None: ...
    def abandon(self) -> None: ...  # it failed: leave the links in step for the next one


# exchange(buf, reducers, check); check(peer, sig_hash, nbytes, expected) refuses a frame
MakeExchange = Callable[[np.ndarray, Any, Callable[[int, int, int, int], None]], Exchange]


class MeshPrepared(NamedTuple):
    """What every call of one signature shares."""

    sig: str
    name: str                  # the collective, for errors
    sig_hash: int
    storage: np.dtype          # the type the buffer is seen as
    reducers: tuple[Reducer, Reducer] | None  # (partial, final); None: a barrier
    exchange: MakeExchange


class MeshPath:
    """The mesh collectives of one ring."""

    def __init__(self, mesh: Mesh, sessions: Sessions, endpoint: Endpoint) -> None:
        self.mesh, self.sessions, self.endpoint = mesh, sessions, endpoint
        self.closed = False
        self._tail: MeshPending | None = None  # the last one started, while it runs
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._staging = np.empty(PIECE_BYTES, np.uint8)  # for one streamed at a time

    @property
    def idle(self) -> bool:
        """Whether none of this path's collectives is running."""
        return self._tail is None or self._tail.done

    def prepare(self, sig: str, dtype: DType | None, reducers: tuple[Reducer, Reducer] | None,
                streamed: bool = False) -> MeshPrepared:
        """The MeshPrepared of `sig` over buffers of `dtype`, reduced with `reducers`
        ((partial, final): collectives.step_reducers); None and None: a barrier.
        `streamed`: an all-reduce streamed round the ring, else exchanged all to all."""
        storage = np.dtype(np.uint8) if dtype is None else dtype.storage
        return MeshPrepared(sig, sig.split()[0], signature_hash(sig), storage, reducers,
                            self._ring_stream if streamed else self._all_to_all)

    def _all_to_all(self, buf: np.ndarray, reducers: Any,
                    check: Callable[[int, int, int, int], None]) -> AllToAll:
        return AllToAll(self.mesh, self.endpoint.rank, buf, reducers, check)

    def _ring_stream(self, buf: np.ndarray, reducers: Any,
                     check: Callable[[int, int, int, int], None]) -> RingStream:
        return RingStream(self.mesh, self.endpoint.rank, len(self.mesh.links) + 1, buf,
                          reducers, self._staging, check)

    def start(self, prepared: MeshPrepared, buf: np.ndarray, timeout: float, spin_us: int,
              then: Callable[[], Any]) -> MeshPending:
        """Number the collective now and send this rank's buffer. Off the loop's thread,
        run it to its end here; on the loop, as far as it goes in `spin_us` (finish() does
        the rest, so that a late peer does not hold the loop), or, while an earlier one
        runs, not at all yet."""
        failure = self.endpoint.inbox.failure
        if failure is not None:  # a peer was lost: every later collective raises it
            raise failure
        seq = self.sessions.take(prepared.sig)
        before = self._tail
        pending = self._tail = MeshPending(self, prepared, buf, seq, timeout, then)
        if before is not None and not before.done:
            pending.before = before
            return pending
        if threading.get_ident() == self._loop_thread:
            pending.begin()
            pending.spin(spin_us * 1e-6)
        else:
            pending.run_here()
        return pending

    def later(self, callback: Callable[..., Any], *args: Any) -> None:
        """Run `callback(*args)` on the ring's event loop, which owns the transport and
        Sessions' bookkeeping."""
        self._loop.call_soon_threadsafe(callback, *args)

    def close(self) -> None:
        """Close the mesh: now, or once the collective that runs on it has raised
        RingClosed, so that no wait is left on a closed socket."""
        self.closed = True
        if self.idle:
            self.mesh.close()


class MeshPending:
    """One mesh collective on this rank, from its start until it is done."""

    def __init__(self, path: MeshPath, prepared: MeshPrepared, buf: np.ndarray, seq: int,
                 timeout: float, then: Callable[[], Any]) -> None:
        self._path, self._prepared, self._buf = path, prepared, buf
        self.seq, self._then = seq, then
        self._deadline = time.monotonic() + timeout
        self._timeout = timeout
        self._exchange = prepared.exchange(buf, prepared.reducers, self._check_frame)
        self.before: MeshPending | None = None  # the one that must finish first
        self.done = False
        self._finished: asyncio.Future | None = None  # for the one after, if it waits
        self._entry = path.sessions.flight.opened(seq, prepared.sig, buf.nbytes, self)

    def value(self) -> Any:
        return self._then()

    def waiting_on(self) -> int | None:
        """The rank whose data this rank waits for, if any."""
        return self._exchange.waiting_on()

    def begin(self) -> None:
        """Start sending this rank's data."""
        try:
            self._exchange.begin(self.seq, self._prepared.sig_hash)
        except BaseException as exc:
            self._fail(exc)
            raise

    def progress(self) -> bool:
        """Write and read what the sockets take and hold now; whether it is done."""
        try:
            if self._path.closed:
                raise RingClosed(f"{self._prepared.name} #{self.seq}: the ring was closed")
            if not self._exchange.progress(self.seq):
                return False
        except BaseException as exc:
            self._fail(exc)
            raise
        self._settle()
        self._path.sessions.raise_late_mismatch(self.seq)
        return True

    def run_here(self) -> None:
        """Run the whole collective on this (the caller's) thread."""
        try:
            self.begin()
            while not self.progress():
                self._check()
                wait_here(self._waits(), SLICE_S)
        except BaseException as exc:
            self._fail(exc)
            raise

    def spin(self, budget: float) -> None:
        """Go on for at most `budget` seconds, polling without sleeping (on the loop's
        thread, as the message path's small receives do: finish() takes on from there)."""
        end = time.perf_counter() + budget
        while not self.progress() and time.perf_counter() < end:
            pass

    async def finish(self) -> Any:
        """Run the rest of the collective on the event loop; return its result."""
        loop = asyncio.get_running_loop()
        try:
            if self.before is not None:
                await self.before.settled()
                self.before = None
                self._check()
                self.begin()
            while not self.progress():
                self._check()
                await wait_on_loop(loop, self._waits(), SLICE_S)
        except BaseException as exc:
            self._fail(exc)
            raise
        return self.value()

    async def settled(self) -> None:
        """Return once this collective is over, done or failed."""
        if not self.done:
            if self._finished is None:
                self._finished = asyncio.get_running_loop().create_future()
            await asyncio.shield(self._finished)

    def _waits(self) -> list[tuple[Link, bool, bool]]:
        """(link, to read, to write) of every link this collective waits on."""
        return self._exchange.waits()

    def _check_frame(self, peer: int, sig_hash: int, nbytes: int, expected: int) -> None:
        """Raise MismatchError (every rank told, as one whose frame is not all out yet
        leaves its peers waiting) where `peer` called another collective, ProtocolError
        where its frame holds `nbytes` where this rank expects `expected`."""
        prepared, roster = self._prepared, self._path.endpoint.roster
        if sig_hash != prepared.sig_hash:
            exc = MismatchError(
                f"{prepared.name} #{self.seq}: {roster.name(peer)} called another collective "
                f"(its signature hash differs) where {roster.me} called '{prepared.sig}'; every "
                "rank must pass the same shape, dtype, op and root" +
                (THREADS if "thread=" in prepared.sig else ""))
            self._path.later(tell_everyone, self._path.endpoint, self.seq, str(exc))
            raise exc
        if nbytes != expected:
            raise ProtocolError(f"{prepared.name} #{self.seq} on {roster.me}: {roster.name(peer)} "
                                f"sent {nbytes} bytes where {expected} were expected")

    def _fail(self, exc: BaseException) -> None:
        """The collective failed with `exc`. A mesh link that broke loses its peer to the
        whole ring, every rank told, as a silent one would be: later collectives, on
        whatever path, raise PeerLost too."""
        if not self.done:
            self._exchange.abandon()
        self._settle(exc)
        if isinstance(exc, LinkBroken):
            self._path.later(self._path.endpoint.lose, exc.rank,
                             f"is cut off: its mesh link broke: {exc.why}")

    def _settle(self, failure: BaseException | None = None) -> None:
        if self.done:
            return
        self.done = True
        self._path.sessions.flight.closed(self._entry, failure)
        if self._path.closed:
            self._path.later(self._path.mesh.close)
        if failure is not None:
            self._path.sessions.moot(self.seq)
            self._path.later(self._path.sessions.failed, self.seq)
        if self._finished is not None and not self._finished.done():
            self._path.later(lambda: self._finished.done() or self._finished.set_result(None))

    def _check(self) -> None:
        """Raise what ends the wait: a lost peer, another rank's word that the ranks called
        different collectives, or the deadline."""
        endpoint = self._path.endpoint
        if endpoint.inbox.failure is not None:
            raise endpoint.inbox.failure
        notice = self._path.sessions.fate(self.seq)
        if notice is not None:
            raise notice
        if time.monotonic() > self._deadline:
            missing = self._exchange.waiting_on()
            waited = endpoint.roster.name(missing) if missing is not None else \
                "its peers to take its frame"
            raise CollectiveTimeout(f"{self._prepared.name} #{self.seq} on {endpoint.roster.me} "
                                    f"timed out after {self._timeout:g} s waiting for {waited} "
                                    "on the mesh")
