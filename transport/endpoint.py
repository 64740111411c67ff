"""One rank's end of the ring: it routes each message over one of three kinds of link and
files what arrives in its inbox; it knows nothing of what payloads mean.

    ZmqLinks     (zmq_links.py)     every message, until and unless another link takes it
    DirectLinks  (direct_links.py)  small messages, over plain stream sockets
    SharedLinks  (shared_links.py)  collective payloads to peers on this host, in /dev/shm

Liveness (liveness.py) keeps the verdicts on lost peers; the Roster (roster.py) says who
is where. Each is an object of its own, handed the callbacks it needs; the endpoint
routes between them, checks each message that arrives, and hands control messages to
whoever handles their kind (on()).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any, Callable, Iterator

import numpy as np
import zmq

from ringlib.errors import ProtocolError, RendezvousTimeout, RingClosed

from . import frames, segment_names
from .direct import remove_socket_files
from .direct_links import DirectLinks
from .frames import CHECKED, DATA, TOKENED, Header, Key, Kind, decode, encode, pack, unpack
from .inbox import Inbox, Message
from .limited_log import LimitedLog
from .liveness import Liveness
from .roster import Roster
from .security import Keys
from .shared import HELD, discard
from .shared_links import SharedLinks
from .zmq_links import CLOSE_LINGER_S, ZmqLinks

log = logging.getLogger(__name__)

# Messages up to this size go over a direct link where one is up (see direct.py).
DIRECT_BYTES = 256 << 10
# Arrays from this size go to a shared-memory peer by address where it can read this
# process (single_copy.py), smaller ones through the ring.
SINGLE_COPY_BYTES = 256 << 10
# Polls of the shared-memory links per poll of the sockets, while a receive spins.
_SHARED_POLLS = 8


class Endpoint:
    """Sends to and receives from the other ranks.

    With `keys` every ZeroMQ link is authenticated and encrypted (CurveZMQ, see
    security.py). Direct links are plain sockets: with keys they carry doorbells alone,
    which say nothing but "read your shared-memory link", and anything else that comes
    on them is dropped; shared memory needs no encryption (its segments are this user's
    alone, and their names and nonces travel encrypted).
    """

    def __init__(self, rank: int, keys: Keys | None = None) -> None:
        self.roster = Roster(rank)
        self.keys = keys
        self._warnings = LimitedLog(log)  # of what strangers may send
        self.inbox = Inbox(self._warnings.warning)
        self.zmq = ZmqLinks(self.roster, keys, self._file, self.inbox.close)
        self._plain = keys is None  # whether payloads may travel on plain links
        self.direct = DirectLinks(self.roster, self._deliver_direct, self._drop, self._resend)
        self.shared = SharedLinks(self.roster, self.notify, self._deliver_packed, self._drop)
        self.liveness = Liveness(self.roster, self.notify, self.inbox.fail, self._forget,
                                 self._file_all, self._waits_on)
        self.direct_bytes = DIRECT_BYTES
        self.single_copy_bytes = SINGLE_COPY_BYTES
        self._may_poll = False  # whether receives may poll the links (not on inproc)
        self._waiting = 0       # receives waiting on the event loop (see recv)
        # the rank a compiled collective waits for in the shared arena, if one does
        # (collectives/compiled.py): waiting on it, as a receive does
        self.arena_waits_on: int | None = None
        self._control: dict[Kind, Callable[[Message], None]] = {
            Kind.LINK: self.direct.take, Kind.HEARTBEAT: lambda message: None,
            Kind.LOST: self.liveness.reported_lost, Kind.BYE: self._said_bye,
            Kind.SHARED: self.shared.answer,
            Kind.DOORBELL: lambda message: self.shared.poll(message.header.sender)}
        self._closed = False
        self._expecting: set[int] = set()  # see expecting()
        self._doorbell = encode(frames.control(Kind.DOORBELL, rank))

    @property
    def rank(self) -> int:
        return self.roster.rank

    @rank.setter
    def rank(self, value: int) -> None:
        """A re-formed ring renumbers its ranks (runtime/reform.py)."""
        self.roster.rank = value
        self._doorbell = encode(frames.control(Kind.DOORBELL, value))

    @property
    def address(self) -> str | None:
        return self.roster.address

    @property
    def peer_addresses(self) -> dict[int, str]:
        return self.roster.peers

    def on(self, kind: Kind, handler: Callable[[Message], None]) -> None:
        """Hand every message of `kind` to `handler` instead of the inbox: those that
        arrive from now on, and first those the inbox kept before there was a handler."""
        self._control[kind] = handler
        for message in self.inbox.kept(lambda key: key.kind == kind):
            handler(message)
        self.inbox.purge(lambda key: key.kind == kind)

    def bind(self, address: str, also: str | None = None) -> str:
        """Bind the receiving socket at `address` (tcp port 0 picks a free port), and at
        `also` (where only start-up's first words come); return the address the other
        peers should connect to."""
        self.roster.address = self.zmq.bind(address, also)
        # An inproc sender lives in this process, often on this very loop: polling for its
        # message would only keep it from running.
        self._may_poll = not address.startswith("inproc://")
        self.direct.listen()
        return self.roster.address

    def set_peers(self, table: list[str]) -> None:
        """Learn every rank's address; links open on first use or through connect()."""
        self.roster.peers.update(enumerate(table))

    def connect(self, rank: int, address: str) -> None:
        """Open the sending link to `rank` at `address`."""
        self.roster.peers[rank] = address
        self.zmq.connect(rank)

    async def offer_links(self, ranks: list[int]) -> None:
        """Tell `ranks` where to open direct links to this rank (see direct_links.py);
        nothing is offered where this rank takes none."""
        offer = self.direct.offer
        for rank in ranks if offer is not None else ():
            await self.send(rank, frames.control(Kind.LINK, self.rank), offer)

    def offer_shared(self, capacities: dict[int, int]) -> None:
        """Offer each rank a shared-memory link of the given capacity (see shared_links.py);
        those on this host take it. Not within one process (inproc), where it buys nothing."""
        if self._may_poll:
            removed = segment_names.remove_orphans()
            if removed:
                log.info("%s removed %d shared-memory offers of processes that are gone",
                         self.roster.me, removed)
            self.shared.job = segment_names.job([self.roster.peers[r]
                                                 for r in sorted(self.roster.peers)])
            for rank, capacity in capacities.items():
                self.shared.offer(rank, capacity)

    async def settle_shared(self, ranks: list[int], timeout: float) -> None:
        """Wait until every one of `ranks` answered this rank's offer and sent its own (see
        SharedLinks.settled), so that both ends of each link know what it can do, and
        collectives that choose their algorithm by it choose alike on every rank. Part of
        start-up: RendezvousTimeout after `timeout` seconds, naming the silent ranks."""
        deadline = time.monotonic() + timeout
        with self.expecting(ranks):
            while self._may_poll and not self.shared.settled(ranks):
                if time.monotonic() > deadline:
                    silent = ", ".join(map(self.roster.name, self.shared.unsettled(ranks)))
                    raise RendezvousTimeout(f"{self.roster.me}: {silent} did not answer "
                                            f"about shared memory within {timeout:g} s")
                await self.inbox.unless_failed(asyncio.sleep(1e-3))

    @contextlib.contextmanager
    def expecting(self, ranks: list[int]) -> Iterator[None]:
        """A start-up wait that needs words from every one of `ranks`: one that says BYE
        meanwhile is lost (see Liveness), instead of being waited for to the timeout."""
        self._expecting = set(ranks)
        try:
            yield
        finally:
            self._expecting = set()

    def links(self) -> dict[str, list[int]]:
        """The peers each kind of link beside ZeroMQ carries to, now: "shared", the ranks
        this rank writes collective payloads to through shared memory; "direct", those it
        sends small messages to over direct links."""
        return {"shared": self.shared.peers(), "direct": self.direct.linked_peers()}

    def shares_memory_with_all(self) -> bool:
        """Whether this rank has shared-memory links both ways with every peer: all ranks
        are on this host, with shared memory on. Alike on every rank once start-up is
        over: a rank elsewhere, or one that offers none, is linked to no rank, so every
        rank finds a peer it is not linked to."""
        return all(self.shared.linked(rank) for rank in self.roster.peers
                   if rank != self.rank)

    def reaches(self, rank: int) -> bool:
        """Whether this rank and `rank` can each read and write the other's memory (alike
        on both once start-up is over: see SharedLinks.reach)."""
        return self.shared.reach(rank)

    def watch(self, ranks: list[int], interval: float, timeout: float) -> None:
        """Beat to `ranks` and lose any that falls silent (see Liveness.watch)."""
        self.liveness.watch(ranks, interval, timeout, self.zmq.secure)

    async def send(self, to: int, header: Header, payload: Any = None,
                   deadline: float | None = None, writable: bool = False,
                   held: bool = False) -> Any:
        """Queue one message for rank `to` over the best link to it; the payload buffer
        is shared, not copied, when large. The header's nbytes is set to the payload's
        length. Returns a tracker, done once the payload buffer may change again, or None
        when there is nothing to wait for (see ZmqLinks.send). A send that must wait for
        room gives up with TimeoutError at `deadline` (the event loop's time).

        Collective payloads to a peer on this host go through shared memory, and large
        arrays by address to a peer that can read this process (single_copy.py), with a
        Released tracker; `writable` ones always do where the peer can, and the peer may
        write into them until it releases them. A `held` stream payload (one its receiver
        releases when done with it) goes through shared memory too, copied in.
        """
        if self._closed:
            raise RingClosed(f"rank {self.rank}: endpoint is closed")
        if self.inbox.failure is not None:  # nothing more goes out once a peer is lost
            raise self.inbox.failure
        nbytes = 0 if payload is None else memoryview(payload).nbytes
        if header.nbytes != nbytes:
            header = frames.sized(header, nbytes)
        if header.kind != DATA:
            header = self._stamped(header)
        if header.kind == DATA or held:
            written = self._write_shared(to, header, payload, nbytes, writable, not held)
            if written is not None:
                return written[0]
        if self._plain and nbytes <= self.direct_bytes and \
                self.direct.send(to, encode(header), payload):
            return None
        parts = [encode(header)] if payload is None else [encode(header), payload]
        return await self.zmq.send(to, parts, deadline, self.inbox.unless_failed)

    def _write_shared(self, to: int, header: Header, payload: Any, nbytes: int,
                      writable: bool, may_lend: bool) -> tuple[Any] | None:
        """(tracker,) if the shared-memory link to `to` took the message, else None;
        `may_lend`: a large array may go by address (the caller awaits the tracker)."""
        writer = self.shared.writer_to(to)
        if writer is None:
            return None
        by_address = may_lend and writer.single_copy and isinstance(payload, np.ndarray) and \
            (writable or 0 < self.single_copy_bytes <= nbytes)
        written = writer.write(pack(header), payload, by_address, writable)
        if written is None:
            return None
        asleep, tracker = written
        if asleep:
            self._ring_doorbell(to)
        return (tracker,)

    def _resend(self, to: int, header: bytes, payload: bytes | None) -> None:
        """Send over ZeroMQ a frame that a failed direct link to `to` did not carry whole,
        unless `to` is gone; a peer whose queue is full too is lost (its message would
        be)."""
        if to in self.liveness.lost:
            return
        if not self.zmq.send_now(to, [header] if payload is None else [header, payload]):
            self.lose(to, "takes nothing: its direct link failed, and ZeroMQ's queue to it "
                          "is full")

    def _ring_doorbell(self, to: int) -> None:
        """Wake rank `to` to read its shared-memory link: over the direct link if one is up."""
        if not self.direct.send(to, self._doorbell, None):
            self.notify(to, frames.control(Kind.DOORBELL, self.rank))

    def notify(self, to: int, header: Header, payload: bytes | None = None) -> None:
        """Send a control message at once over ZeroMQ, without waiting, even after a peer
        was lost. It is dropped when the peer's queue is full: a peer that takes nothing
        is being lost anyway."""
        if self._closed:
            return
        header = self._stamped(frames.sized(header, len(payload or b"")))
        if not self.zmq.send_now(to, [encode(header)] if payload is None
                                 else [encode(header), payload]):
            log.info("rank %d: no room to tell rank %d %s", self.rank, to, header.kind.name)

    async def recv(self, key: Key, spin: float = 0.0, despite_failure: bool = False) -> Message:
        """The message filed under `key`, waiting for it if needed (after polling for up
        to `spin` seconds: see poll). `despite_failure` waits even after a peer was lost
        (see Inbox.get)."""
        message = self.poll(key, spin)
        if message is not None:
            return message
        self._waiting += 1
        if self._waiting == 1:
            self.shared.sleep()  # peers ring from now on; what came meanwhile is filed
        try:
            return await self.inbox.get(key, despite_failure)
        finally:
            self._waiting -= 1
            if self._waiting == 0:
                self.shared.wake()

    def poll(self, key: Key, spin: float = 0.0) -> Message | None:
        """The message filed under `key` if it is here, without yielding.

        With `spin` (seconds) the links are first polled for up to that long: a message a
        few dozen microseconds away then arrives without the wake-ups of the loop, the
        reader task and the waiter, which cost more than that. Worth it only for small,
        latency-bound collectives; never done on inproc.
        """
        if spin <= 0 or not self._may_poll or self._closed:
            return self.inbox.take(key)
        # Collective payloads from a peer on this host come through its ring (streams'
        # tensors may too, but nobody spins for those).
        shared = key.kind == DATA and key.sender in self.shared.readers
        if shared:
            self.shared.poll(key.sender)  # its message is often there already
        message = self.inbox.take(key)
        if message is None:
            message = self._poll_for(key, time.perf_counter() + spin, shared)
        return message

    def _poll_for(self, key: Key, deadline: float, shared: bool) -> Message | None:
        """Poll the links until the message is here or the deadline passed: a `shared`
        message's ring first (a few loads), the sockets (system calls) less often."""
        while True:
            for _ in range(_SHARED_POLLS if shared else 0):
                self.shared.poll(key.sender)
                message = self.inbox.take(key)
                if message is not None:
                    return message
            self._file_all()
            message = self.inbox.take(key)
            if message is not None or time.perf_counter() >= deadline:
                return message

    def _file_all(self) -> None:
        """File what every link holds now, without waiting."""
        self.zmq.file_ready()
        self.direct.poll()
        self.shared.poll()

    def _file(self, parts: list[zmq.Frame]) -> None:
        """File one message from ZeroMQ."""
        if len(parts) > 2:
            self._drop(f"{len(parts)} frames in one message; at most 2 expected")
        else:
            self._deliver(parts[0].buffer, parts[1] if len(parts) == 2 else None)

    def _deliver(self, header: bytes | memoryview, payload: Any,
                 parse: Callable[[Any], Header] = decode, plain_link: bool = False) -> None:
        """File one message, from ZeroMQ, a direct link (`plain_link`) or (with `parse`
        unpack) a shared-memory ring, or hand a control message to its handler."""
        try:
            message = Message(parse(header), payload)
        except ProtocolError as exc:
            return self._drop(str(exc), payload)
        h, nbytes = message.header, 0 if payload is None else len(payload)
        if plain_link and not self._plain:  # anyone may write there: a wake-up, no more
            if h.kind != Kind.DOORBELL or payload is not None:
                return self._drop(f"{h.kind.name} from rank {h.sender} on a plain link of a "
                                  "ring with keys", payload)
            return self._control[h.kind](message)  # not a sign of life: it proves nothing
        if h.nbytes != nbytes:
            return self._drop(f"{h.kind.name} from rank {h.sender} has {nbytes} payload bytes "
                              f"under a header of {h.nbytes}", payload)
        if isinstance(payload, HELD) and h.kind != DATA and h.kind != Kind.STREAM:
            return self._drop(f"{h.kind.name} from rank {h.sender} in shared memory", payload)
        if h.kind in CHECKED and h.sig != self.roster.tokens.get(h.sender):
            return self._drop(f"{h.kind.name} from rank {h.sender} without its token: a "
                              "stranger, or a ring at that address that is gone", payload)
        self.liveness.heard(h.sender)
        act = self._control.get(h.kind)
        if act is None:
            self.inbox.deliver(message)
        else:
            act(message)

    def _stamped(self, header: Header) -> Header:
        """`header` with this rank's token, if its kind carries one (frames.TOKENED)."""
        return frames.tokened(header, self.roster.token) if header.kind in TOKENED else header

    def _deliver_direct(self, header: bytes, payload: Any) -> None:
        self._deliver(header, payload, plain_link=True)

    def _deliver_packed(self, header: memoryview, payload: Any) -> None:
        self._deliver(header, payload, unpack)

    def _drop(self, why: str, payload: Any = None) -> None:
        discard(payload)
        self._warnings.warning("%s dropped a message: %s", self.roster.me, why)

    @property
    def plain(self) -> bool:
        """Whether payloads may travel on plain sockets (the ring has no keys)."""
        return self._plain

    def _said_bye(self, message: Message) -> None:
        """BYE: the sender closed its ring and reads nothing more, so what this rank lent
        it by address is free now, not when a failed collective gives up on it."""
        self.shared.left(message.header.sender)
        self.liveness.said_bye(message)

    def lose(self, rank: int, why: str) -> None:
        """Declare `rank` lost, as the watchdog does one that falls silent: every receive
        fails with PeerLost, and every other rank is told (Liveness.lose)."""
        self.liveness.lose(rank, why)

    def _waits_on(self, rank: int) -> bool:
        """Whether a receive from `rank`, a send to it, a start-up wait for its words, or a
        compiled collective waits on it now."""
        return rank in self._expecting or self.inbox.waits_on(rank) or \
            self.zmq.waits_for_room(rank) or rank == self.arena_waits_on

    def _forget(self, rank: int, died: bool) -> None:
        """`rank` was lost: drop its shared-memory links and, if it `died` (a rank that
        closed removed its own, and may have re-opened there), the files it left."""
        if died:
            remove_socket_files(self.roster.peers[rank])
        self.shared.lose(rank, died)

    async def close(self, why: str = "") -> None:
        """Say BYE (with `why`, if this rank gives up), stop receiving, fail pending
        receives with RingClosed, and close every link; messages already queued are still
        delivered (see ZmqLinks.close)."""
        if self._closed:
            return
        # Nothing waits to reach a rank that is lost, said BYE (filed now, if it came), or
        # was never heard from (a start-up that failed): closing must not linger for it.
        self._file_all()
        gone = self.liveness.gone() | {r for r in self.zmq.connected
                                       if r not in self.roster.tokens}
        # What the direct links keep is written first, before the BYE.
        self.direct.close(CLOSE_LINGER_S, gone)
        for rank in self.zmq.connected:  # so that its peers take this rank for gone, not dead
            if rank not in gone:
                self.notify(rank, frames.control(Kind.BYE, self.rank), why.encode() or None)
        self._closed = True
        self.inbox.close(RingClosed(f"rank {self.rank}: endpoint closed"))
        await self.liveness.stop()
        await self.zmq.stop_reading()
        self.shared.close()
        await self.zmq.close(gone)
        self._warnings.flush()
