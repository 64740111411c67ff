"""The compiled path: a collective of a ring whose ranks all map one arena runs as calls of
arena_kernels.run, with no message, no Channel and no turn of the event loop when its
peers are there within the spin budget.

A CompiledPath numbers its collectives with the ring's Sessions, in call order, so that
they interleave with the collectives that take messages exactly as before; it runs its
own one at a time, in that order (a later one waits for the one before). Everything a
call needs that depends only on the collective's signature (its hash, its kind, the
kernel's state) is made once per signature and kept (Prepared).

Waiting is bounded. A Pending's first call spins, then yields the core, for the ring's
spin budget; past it the rest of the wait runs on the event loop (finish()), which sleeps
between calls, so heartbeats go on, a lost peer raises PeerLost, a deadline raises
CollectiveTimeout, and a rank that waits long burns no core. Ranks that call different
collectives raise MismatchError on every rank: each checks every peer's signature hash
in the arena, and a peer that ran the collective with messages instead (its size or its
settings differ) is told through Sessions, as the message path tells its ranks.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import time
from typing import Any, Callable, NamedTuple

import numba
import numpy as np

from ringlib import arena_kernels as ak
from ringlib.errors import CollectiveTimeout, MismatchError
from ringlib.transport import Endpoint
from ringlib.transport.arena import Arena

from .session import THREADS, Sessions, tell_everyone

PAUSE_US = 10              # of the spin budget, how long a wait polls before it yields
# The budget grows with the buffer by the time the peers take to copy and reduce it
# (about a nanosecond a byte here), so that a large collective whose peers are working
# does not fall through to the loop's sleeps.
WORK_NS_PER_BYTE = 1.0
RESUME_NS = 2_000          # how long each later call polls, between the loop's sleeps
FIRST_SLEEP_S, LAST_SLEEP_S = 20e-6, 250e-6  # the loop's sleeps between calls, doubling
_OPS = {"sum": ak.SUM, "prod": ak.PROD, "min": ak.MIN, "max": ak.MAX, "mean": ak.MEAN}
KINDS = {"all_reduce": ak.ALL_REDUCE, "split_all_reduce": ak.SPLIT_ALL_REDUCE,
         "broadcast": ak.BROADCAST, "all_gather": ak.ALL_GATHER,
         "reduce_scatter": ak.REDUCE_SCATTER, "barrier": ak.BARRIER}


def signature_hash(sig: str) -> int:
    """A hash of a signature that every process computes alike (str's hash() is salted
    per process), in 63 bits: an int64 word of the arena."""
    return int.from_bytes(hashlib.blake2b(sig.encode(), digest_size=8).digest(), "little") >> 1


class Prepared(NamedTuple):
    """What every call of one signature shares."""

    sig: str
    name: str             # the collective, for errors
    storage: np.dtype     # the type the kernel sees the buffer and the slots as
    count: Any            # the world size in the arithmetic type (a mean's divisor)
    state: np.ndarray     # the kernel's state for a call that starts now (it resets it)
    fresh: np.ndarray     # ... as it is before the first call, to copy
    kernel: Callable      # arena_kernels.run compiled for these types, without dispatch
    ctrl: np.ndarray      # the arena's control words
    slots: np.ndarray     # the arena's slots, seen as `storage`


@functools.cache
def _kernel(storage: np.dtype, count_type: type) -> Callable:
    """arena_kernels.run compiled for buffers of `storage` (writable, aligned, C order)
    and a count of `count_type`, as a callable that skips Numba's dispatch: a microsecond
    of every call, a sixth of a small all-reduce."""
    array = lambda ndim, kind=numba.from_dtype(storage): numba.types.Array(kind, ndim, "C")
    words = numba.types.Array(numba.int64, 1, "C")
    sig = (words, array(3), array(1), words, numba.typeof(count_type(0)), numba.int64,
           numba.int64, numba.int64)
    ak.run.compile(sig)
    return ak.run.overloads[sig].entry_point


class CompiledPath:
    """The compiled collectives of one ring, over the arena its ranks share."""

    def __init__(self, arena: Arena, sessions: Sessions, endpoint: Endpoint) -> None:
        self.arena, self._sessions, self._endpoint = arena, sessions, endpoint
        self.capacity = arena.capacity
        self._tail: Pending | None = None  # the last one started, while it runs
        self._loop = asyncio.get_running_loop()

    def later(self, callback: Callable[..., Any], *args: Any) -> None:
        """Run `callback(*args)` on the ring's event loop: the transport and Sessions'
        bookkeeping are the loop's, and a blocking ring runs collectives on its caller's
        thread."""
        self._loop.call_soon_threadsafe(callback, *args)

    @property
    def idle(self) -> bool:
        """Whether none of this path's collectives is running."""
        return self._tail is None or self._tail.done

    def prepare(self, sig: str, kind: str, storage: np.dtype, op: str = "sum",
                root: int = 0, count: Any = 0) -> Prepared:
        """The Prepared of `sig`, a collective of `kind` (a KINDS key) over buffers seen as
        `storage`; `count` is the world size in the arithmetic type where `op` is a mean."""
        state = np.full(ak.PEERS + self.arena.ranks, -1, np.int64)
        state[:ak.PEERS] = 0
        state[ak.RANK], state[ak.SIZE] = self._endpoint.rank, self.arena.ranks
        state[ak.SIG], state[ak.KIND] = signature_hash(sig), KINDS[kind]
        state[ak.OP], state[ak.ROOT] = _OPS[op], root
        return Prepared(sig, sig.split()[0], storage, count, state, state.copy(),
                        _kernel(storage, type(count)), self.arena.ctrl,
                        self.arena.slots(storage))

    def start(self, prepared: Prepared, buf: np.ndarray, timeout: float, spin_us: int,
              then: Callable[[], Any]) -> Pending:
        """Number the collective now and run it as far as the spin budget takes it (all of
        it, where the peers are there), unless one started earlier still runs: then it
        waits for that one in finish(). `then()` gives its result once done."""
        failure = self._endpoint.inbox.failure
        if failure is not None:  # a peer was lost: every later collective raises it
            raise failure
        seq = self._sessions.take(prepared.sig)
        spin = min(spin_us, PAUSE_US) * 1000
        give = spin_us * 1000 - spin + int(buf.nbytes * WORK_NS_PER_BYTE)
        before = self._tail
        if before is None or before.done:  # the prepared state is free: run it there
            pending = self._tail = Pending(self, prepared, buf, prepared.state, seq, timeout,
                                           then)
            if not pending.step(spin, give):
                pending.own_state()
        else:
            pending = self._tail = Pending(self, prepared, buf, prepared.fresh.copy(), seq,
                                           timeout, then)
            pending.before = before
        return pending

    def close(self) -> None:
        self.arena.close()


class Pending:
    """One compiled collective on this rank, from its first call until it is done."""

    __slots__ = ("_path", "_prepared", "_buf", "_state", "seq", "_timeout", "_then",
                 "_started", "before", "done", "_finished", "_entry")

    def __init__(self, path: CompiledPath, prepared: Prepared, buf: np.ndarray,
                 state: np.ndarray, seq: int, timeout: float,
                 then: Callable[[], Any]) -> None:
        self._path, self._prepared, self._buf, self._state = path, prepared, buf, state
        self.seq, self._timeout, self._then = seq, timeout, then
        self._started = 0.0  # when the wait on the loop began: see finish()
        self.before: Pending | None = None  # the one that must finish first
        self.done = False
        self._finished: asyncio.Future | None = None  # for the one after, if it waits
        self._entry = path._sessions.flight.opened(seq, prepared.sig, buf.nbytes, self)

    def waiting_on(self) -> int | None:
        """The rank whose slot the kernel last waited on, if it waited."""
        waited = int(self._state[ak.WAITED])
        return None if waited < 0 else waited

    def own_state(self) -> None:
        """Go on in a state of its own, and give the prepared one back as it was: a call
        that did not finish leaves its progress there."""
        prepared = self._prepared
        self._state = prepared.state.copy()
        prepared.state[:] = prepared.fresh

    def value(self) -> Any:
        """The collective's result, once done."""
        return self._then()

    def step(self, spin: int = RESUME_NS, give: int = 0) -> bool:
        """One call of the kernel with a budget of `spin` ns polling, then `give` ns
        yielding; whether the collective is done. Raises MismatchError where a peer
        called another collective."""
        prepared, buf = self._prepared, self._buf
        flags = buf.flags  # the compiled kernel's types: anything else goes by dispatch
        kernel = prepared.kernel if flags.writeable and flags.aligned else ak.run
        code = kernel(prepared.ctrl, prepared.slots, buf, self._state, prepared.count,
                      self.seq, spin, give)
        if code == ak.WAITING:
            return False
        if code == ak.FINISHED:
            self._settle()
            self._path._sessions.raise_late_mismatch(self.seq)
            return True
        if self._state is prepared.state:
            self.own_state()
        exc = self._mismatch(code)
        self._settle(exc)
        if code == ak.SKIPPED:  # that peer waits for messages: tell it, and the others
            self._path.later(tell_everyone, self._path._endpoint, self.seq, str(exc))
        raise exc

    async def finish(self) -> Any:
        """Wait on the event loop for the collective to be done; return its result."""
        self._started = time.monotonic()
        try:
            if self.before is not None:
                await self.before.settled()
                self.before = None
                self._check()
                if self.step():
                    return self.value()
            delay, endpoint = FIRST_SLEEP_S, self._path._endpoint
            while True:
                endpoint.arena_waits_on = int(self._state[ak.WAITED])  # see Liveness
                await asyncio.sleep(delay)
                self._check()  # first: once a peer is lost, no collective completes
                if self.step():
                    return self.value()
                delay = min(2 * delay, LAST_SLEEP_S)
        except BaseException as exc:
            if not self.done:
                ak.withdraw(self._prepared.ctrl, self._state)
                self._settle(exc)
            raise
        finally:
            self._path._endpoint.arena_waits_on = None

    async def settled(self) -> None:
        """Return once this collective is over, done or failed."""
        if not self.done:
            if self._finished is None:
                self._finished = asyncio.get_running_loop().create_future()
            await asyncio.shield(self._finished)

    def _settle(self, failure: BaseException | None = None) -> None:
        self.done = True
        self._path._sessions.flight.closed(self._entry, failure)
        if failure is not None:
            self._path._sessions.moot(self.seq)
            self._path.later(self._path._sessions.failed, self.seq)
        if self._finished is not None and not self._finished.done():
            self._finished.set_result(None)

    def _check(self) -> None:
        """Raise what ended the wait: a lost peer, another rank's word that the ranks
        called different collectives, or the deadline."""
        failure = self._path._endpoint.inbox.failure
        if failure is not None:
            raise failure
        notice = self._path._sessions.fate(self.seq)
        if notice is not None:
            raise notice
        if time.monotonic() > self._started + self._timeout:
            roster = self._path._endpoint.roster
            raise CollectiveTimeout(
                f"{self._prepared.name} #{self.seq} on {roster.me} timed out after "
                f"{self._timeout:g} s waiting for {roster.name(int(self._state[ak.WAITED]))} "
                "in the shared arena")

    def _mismatch(self, code: int) -> MismatchError:
        roster, sig = self._path._endpoint.roster, self._prepared.sig
        peer = roster.name(int(self._state[ak.CULPRIT]))
        did = ("called another collective (its signature hash differs)"
               if code == ak.MISMATCHED else
               "ran it otherwise (with messages: another size, setting or collective)")
        return MismatchError(f"{self._prepared.name} #{self.seq}: {peer} {did} where "
                             f"{roster.me} called '{sig}'; every rank must pass the same "
                             "shape, dtype, op and root" + (THREADS if "thread=" in sig else ""))


def warm_compiled() -> None:
    """Compile (or load from Numba's cache) the calls of float32 collectives and barriers,
    on a ring of one, while the peers gather at start-up."""
    for storage, count in ((np.dtype(np.float32), np.float32(1)), (np.dtype(np.uint8), 0)):
        ctrl = np.zeros(ak.WORDS, np.int64)
        state = np.zeros(ak.PEERS + 1, np.int64)
        state[ak.SIZE] = 1
        _kernel(storage, type(count))(ctrl, np.zeros((1, 2, 1), storage), np.zeros(1, storage),
                                      state, count, 1, 0, 0)
    ak.withdraw(ctrl, state)
