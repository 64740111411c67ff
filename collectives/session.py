"""A collective's life on one rank, in one place: its number, the signature every piece
of it must carry, the word to the other ranks when one does not, what happens to its
late messages after it failed, and the wait for what it lent before it returns.

Sessions numbers the collectives of one endpoint in the order they are called, which is
the order on every rank (several may be in flight: their messages never mix), and, as the
inbox's Filter, checks every collective piece that arrives against the signature of its
collective: its name, dtype, shape, op and root, and the algorithm where ranks choose it
by what they know of their links. A rank that finds a piece of another signature raises
MismatchError and tells every other rank (MISMATCH), which raise it too: no rank is left
waiting for a step that will never come. A rank that finished a collective before the
word came (a broadcast's root, which receives nothing) raises it on the collective it is
in when the word comes, or on the next, which every rank still completes, so that none
falls out of step.

Ranks whose collectives exchange no message at all (an all-reduce on two ranks against a
broadcast on a third) would wait out the deadline: a receive that waits long asks its
sender what it runs (WAITING, see Channel), and the sender compares it with the
collective of that number it runs, ran, or is yet to open.
"""

from __future__ import annotations

import asyncio
import itertools
from concurrent.futures import Executor
from typing import Any, Awaitable, Callable, TypeVar

import numpy as np

from ringlib.errors import CollectiveTimeout, MismatchError
from ringlib.transport import Endpoint, Header, Key, Kind, Message, discard, frames
from ringlib.transport.frames import DATA
from ringlib.transport.roster import Roster

from .channel import Channel
from .flight import FlightRecorder

T = TypeVar("T")

THREADS = (", from the thread that made the ring or from threads of the same name on every "
           "rank (a blocking ring's collectives carry the caller's thread: runtime/blocking.py)")
# How long a failed collective waits for peers to let go of the buffers it lent them by
# address, so that none touches them after it raised.
WITHDRAW_S = 5.0
# Collectives whose fate is kept after they end (their signature, or their failure), for
# the late messages and WAITING questions that may still come for them.
HISTORY = 1024


class Sessions:
    """The collectives of one endpoint's ring of `world_size` ranks."""

    def __init__(self, endpoint: Endpoint, world_size: int, executor: Executor,
                 flight: FlightRecorder | None = None) -> None:
        self.endpoint, self.world_size, self._executor = endpoint, world_size, executor
        self.flight = flight or FlightRecorder(endpoint.rank)  # every path records here
        self._seq = itertools.count(1)
        self._running: dict[int, Session] = {}
        # seq -> what failed it (None: it failed here); what still comes for it is dropped.
        self._failed: dict[int, BaseException | None] = {}
        self._notices: dict[int, MismatchError] = {}  # seq -> another rank's word on it
        self._done: dict[int, str] = {}  # seq -> signature, of collectives finished here
        self._asked: dict[int, Header] = {}  # seq -> WAITING for one not opened here yet
        self._opened = 0  # the last sequence number taken
        self._loop = asyncio.get_running_loop()
        endpoint.inbox.filter = self
        endpoint.on(Kind.MISMATCH, self._reported)
        endpoint.on(Kind.WAITING, self._asked_about)

    def open(self, sig: str, storage: np.dtype, timeout: float, spin: float,
             segment_elems: int, nbytes: int = 0, algorithm: str = "") -> Session:
        """The next collective, running here as `sig` (a signature()) over `nbytes`, with
        `timeout` seconds to complete; its receives poll for `spin` seconds before they
        yield, and it sends at most `segment_elems` elements per message. It takes its
        number now, so collectives in flight are numbered in the order they were called."""
        seq = self._opened = next(self._seq)
        channel = Channel(self.endpoint, self.world_size, seq, sig.split()[0], sig, storage,
                          self._executor, segment_elems,
                          asyncio.get_running_loop().time() + timeout, spin,
                          timeline=self.flight.timeline)
        session = Session(self, channel, timeout, nbytes, algorithm)
        self._running[seq] = session
        inbox = self.endpoint.inbox
        mismatched = inbox.kept(lambda key: key.kind == DATA and key.seq == seq) if inbox else ()
        asked = self._asked.pop(seq, None)
        for header in [m.header for m in mismatched] + ([asked] if asked else []):
            if header.sig != sig:
                self.abandon(seq, session.mismatch(header))
                break
        return session

    @property
    def running(self) -> bool:
        """Whether a collective with messages is in flight."""
        return bool(self._running)

    def take(self, sig: str) -> int:
        """Number a collective that runs without messages (compiled.py), in call order
        with the others, and remember its signature for the messages and WAITING questions
        of ranks that ran it with messages. Safe from a blocking ring's caller's thread:
        what it must tell other ranks, the loop does."""
        seq = self._opened = next(self._seq)
        self._done[seq] = sig
        self._done.pop(seq - HISTORY, None)
        if self._failed or self._notices:
            self._failed.pop(seq - HISTORY, None)
            self._notices.pop(seq - HISTORY, None)
        asked = self._asked.pop(seq, None)
        if asked is not None and asked.sig != sig:
            self._loop.call_soon_threadsafe(self._mismatched_after, asked, sig)
        return seq

    def fate(self, seq: int) -> MismatchError | None:
        """Another rank's word that collective `seq` was called differently, if one came."""
        return self._notices.pop(seq, None)

    def abandon(self, seq: int, exc: BaseException | None = None) -> None:
        """Collective `seq` failed: drop what is kept for it and what still comes. With
        `exc` (another rank found it failed), its current and later waits raise exc."""
        if self._failed.get(seq) is None:
            self._failed[seq] = exc
        self.endpoint.inbox.purge(lambda key: key.kind == DATA and key.seq == seq, exc)

    def admit(self, message: Message) -> bool:
        """Whether a message may be filed: not a piece of a failed collective, nor one of
        another signature than its collective's here (which fails it)."""
        header = message.header
        if header.kind != DATA:
            return True
        if header.seq in self._failed:
            discard(message.payload)
            return False
        session = self._running.get(header.seq)
        if session is not None and header.sig != session.channel.sig:
            discard(message.payload)
            self.abandon(header.seq, session.mismatch(header))
            return False
        done = self._done.get(header.seq) if session is None else None
        if done is not None and header.sig != done:  # one it ran otherwise, or compiled
            discard(message.payload)
            self._mismatched_after(header, done)
            return False
        return True

    def refusal(self, key: Key) -> BaseException | None:
        """What a wait on a piece of a collective that another rank failed raises."""
        return self._failed.get(key.seq) if key.kind == DATA else None

    def _asked_about(self, message: Message) -> None:
        """Act on WAITING: another rank has long waited for this rank's piece of
        collective `seq`, which it runs as `sig`."""
        theirs = message.header._replace(sig=message.text())  # as its pieces would say
        seq = theirs.seq
        session, done = self._running.get(seq), self._done.get(seq)
        if seq in self._failed:
            return
        if session is not None and theirs.sig != session.channel.sig:
            self.abandon(seq, session.mismatch(theirs))
        elif done is not None and theirs.sig != done:
            self._mismatched_after(theirs, done)
        elif session is None and done is None and seq > self._opened and \
                len(self._asked) < HISTORY:
            self._asked[seq] = theirs  # checked when this rank opens it

    def _mismatched_after(self, theirs: Header, mine: str) -> None:
        """This rank finished collective `theirs.seq` as `mine`, and another rank waits in
        it as another: tell every rank, which raise MismatchError, and raise it here on
        the next collective."""
        why = mismatch_text(theirs.seq, theirs, mine, self.endpoint.roster)
        tell_everyone(self.endpoint, theirs.seq, why)
        self._notices[theirs.seq] = MismatchError(why)
        self.abandon(theirs.seq)  # what else comes for it, a second WAITING too, is moot

    def _reported(self, message: Message) -> None:
        """Act on MISMATCH: another rank found collective `seq` called differently."""
        seq, sender = message.header.seq, message.header.sender
        if seq in self._failed:
            return  # it failed here already
        self._notices[seq] = MismatchError(f"{self.endpoint.roster.me}: {message.text()} "
                                           f"(found by rank {sender})")
        self.abandon(seq, self._notices[seq])

    def failed(self, seq: int) -> None:
        """Collective `seq` failed here: its late messages must not pile up, and what
        another rank said of it is moot."""
        self.moot(seq)
        self.abandon(seq)

    def moot(self, seq: int) -> None:
        """Collective `seq` failed here: from now on, what another rank says of it is moot
        (raise_late_mismatch must not raise it on the next collective, which may run
        before the loop gets to failed()). Dict operations only: safe from a blocking
        ring's caller's thread."""
        self._failed.setdefault(seq, None)
        self._notices.pop(seq, None)

    def finished(self, seq: int) -> None:
        """Collective `seq` is over here, done or failed; what is kept of collectives older
        than HISTORY goes."""
        self._done[seq] = self._running.pop(seq).channel.sig
        for kept in (self._done, self._failed, self._notices):
            kept.pop(seq - HISTORY, None)

    def raise_late_mismatch(self, seq: int) -> None:
        """Raise MismatchError for a collective up to `seq` that this rank finished while
        another rank found it called differently."""
        if not self._notices:
            return
        for late in sorted(s for s in self._notices if s <= seq and s not in self._running):
            exc = self._notices.pop(late)
            if late < seq:
                exc.args = (f"{exc} (after this rank had finished it; #{seq} completed)",)
            self.flight.dump(f"MismatchError: {exc}")
            raise exc


class Session:
    """One collective on this rank: run() it once."""

    def __init__(self, sessions: Sessions, channel: Channel, timeout: float,
                 nbytes: int, algorithm: str = "") -> None:
        self._sessions, self.channel, self._timeout = sessions, channel, timeout
        self._entry = sessions.flight.opened(channel.seq, channel.sig, nbytes, self, algorithm)

    def waiting_on(self) -> int | None:
        """The rank whose piece this collective waits for now, if any."""
        waiting = self.channel.waiting_for
        return None if waiting is None else waiting[0]

    async def run(self, algorithm: Callable[..., Awaitable[T]], *args: Any) -> T:
        """algorithm(channel, *args) under the collective's deadline. It returns once what
        it sent from the caller's buffers has left (ZeroMQ) or been read (by address), so
        the caller may change them; after a failure, once the peers let go of what it lent
        them, or after WITHDRAW_S."""
        ch, failure = self.channel, None
        try:
            result = await algorithm(ch, *args)
            await ch.drain()
        except BaseException as exc:
            self._sessions.failed(ch.seq)
            await ch.withdraw(WITHDRAW_S)
            failure = self._timed_out() if isinstance(exc, TimeoutError) else exc
            if failure is not exc:
                raise failure from None
            raise
        finally:
            ch.release_all()
            self._sessions.finished(ch.seq)
            self._sessions.flight.closed(self._entry, failure)
        self._sessions.raise_late_mismatch(ch.seq)
        return result

    def mismatch(self, theirs: Header) -> MismatchError:
        """The error of a rank that found another calling something else; the other ranks
        are told, so that they raise it too instead of waiting."""
        ch = self.channel
        why = mismatch_text(ch.seq, theirs, ch.sig, ch.endpoint.roster)
        tell_everyone(ch.endpoint, ch.seq, why)
        return MismatchError(why)

    def _timed_out(self) -> CollectiveTimeout:
        ch, roster = self.channel, self.channel.endpoint.roster
        where = f"{ch.name} #{ch.seq} on {roster.me}"
        if ch.waiting_for is None:
            return CollectiveTimeout(f"{where} timed out after {self._timeout:g} s sending to "
                                     "its peers")
        peer, step = ch.waiting_for
        return CollectiveTimeout(f"{where} timed out after {self._timeout:g} s waiting for "
                                 f"{roster.name(peer)} at step {step}")


def tell_everyone(endpoint: Endpoint, seq: int, why: str) -> None:
    """Tell every other rank that collective `seq` mismatched (MISMATCH), and `why`."""
    me = endpoint.roster.rank
    for rank in endpoint.roster.peers:
        if rank != me:
            endpoint.notify(rank, frames.mismatch(seq, me), why.encode())


def mismatch_text(seq: int, theirs: Header, mine: str, roster: Roster) -> str:
    """What a MismatchError says: which collective, which ranks, what each called."""
    return (f"{mine.split()[0]} #{seq}: {roster.name(theirs.sender)} called '{theirs.sig}' "
            f"where {roster.me} called '{mine}'; every rank must pass the same shape, "
            "dtype, op and root" + (THREADS if "thread=" in theirs.sig + mine else ""))
