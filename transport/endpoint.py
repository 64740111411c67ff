"""One peer's end of the ring: a bound PULL socket that receives from everyone, and a PUSH
socket per peer it sends to, all on the process's single asyncio ZeroMQ context.

PULL/PUSH keeps each link one-way and message-oriented: no identities or envelopes, and
ZeroMQ queues and reconnects underneath. Payload frames are sent with copy=False: pyzmq
copies those under its copy threshold (64 KiB) and shares memory with the rest, returning
a MessageTracker that tells when ZeroMQ has let go of the buffer (see wait_sent).

Beside ZeroMQ, small messages take direct socket links (direct_links.py) and collective
payloads to peers on this host take shared memory (shared_links.py); heartbeats and the
verdicts on lost peers are in liveness.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from typing import Any, Callable

import numpy as np
import zmq
import zmq.asyncio

from ringlib.errors import (ProtocolError, RendezvousError, RendezvousTimeout, RingClosed,
                            Unauthorized)

from . import addresses, direct, shared
from .frames import Header, Kind, decode, encode, pack, unpack
from .context import context, gate, hold, let_go
from .direct_links import DirectLinking
from .liveness import Liveness
from .inbox import Inbox, Message
from .security import Keys
from .shared import HELD, discard
from .shared_links import SharedLinks

log = logging.getLogger(__name__)

# How long closing waits for queued outgoing messages to be delivered.
CLOSE_LINGER_MS = 2000
# Plain ints: flag enums make `events & POLLIN` cost microseconds on the polling path.
_EVENTS, _POLLIN = int(zmq.EVENTS), int(zmq.POLLIN)
# Messages up to this size go over a direct link where one is up (see direct.py).
DIRECT_BYTES = 256 << 10
# Arrays from this size go to a shared-memory peer by address where it can read this
# process (single_copy.py), smaller ones through the ring.
SINGLE_COPY_BYTES = 256 << 10
# Polls of the shared-memory links per poll of the sockets, while a receive spins.
_SHARED_POLLS = 8

class Endpoint(Liveness, DirectLinking):
    """Sends to and receives from the other ranks; knows nothing about what payloads mean.

    With `keys` every ZeroMQ link is authenticated and encrypted (CurveZMQ, see
    security.py), and no direct link is offered or taken: those are plain sockets.
    """

    def __init__(self, rank: int, keys: Keys | None = None) -> None:
        self._rank = rank
        self.keys = keys
        self.address: str | None = None
        self.inbox = Inbox()
        self._pull = context().socket(zmq.PULL)
        self._pull.linger = 0
        if keys is not None:
            try:
                keys.server(self._pull)
            except zmq.ZMQError as exc:
                self._pull.close(0)
                raise Unauthorized(f"rank {rank}: ZeroMQ refused the CurveZMQ keys: {exc}") \
                    from None
            gate().admit(keys)
        hold()  # nothing below fails: close() lets go
        # The same socket as a plain one, for reads that do not yield to the event loop.
        self._pull_now = zmq.Socket.shadow(self._pull.underlying)
        self._push: dict[int, zmq.asyncio.Socket] = {}
        self._push_now: dict[int, zmq.Socket] = {}  # the same sockets, plain
        self.peer_addresses: dict[int, str] = {}
        self._reader: asyncio.Task | None = None
        self._may_poll = False
        self._listener: direct.Listener | None = None
        self._links: dict[int, direct.Writer] = {}
        self.direct_bytes = DIRECT_BYTES
        self.single_copy_bytes = SINGLE_COPY_BYTES
        self._init_liveness()
        self.shared = SharedLinks(rank, self.notify, self._deliver_packed, self.peer_addresses)
        self._waiting = 0  # receives waiting on the event loop (see recv)
        self._control = {Kind.LINK: self._open_link, Kind.HEARTBEAT: lambda message: None,
                         Kind.LOST: self._reported_lost, Kind.BYE: self._said_bye,
                         Kind.MISMATCH: self._reported_mismatch, Kind.SHARED: self.shared.answer,
                         Kind.DOORBELL: lambda message: self.shared.poll(message.header.sender)}
        self._closed = False

    @property
    def rank(self) -> int:
        return self._rank

    @rank.setter
    def rank(self, value: int) -> None:
        """A re-formed ring renumbers its ranks (runtime/reform.py); segment names follow."""
        self._rank = self.shared.rank = value

    def bind(self, address: str) -> str:
        """Bind the receiving socket at `address` (tcp port 0 picks a free port); return
        the address the other peers should connect to."""
        addresses.check(address, bind=True)
        endpoint = addresses.bind_address(address)
        try:
            if endpoint.endswith(":0"):
                port = self._pull.bind_to_random_port(endpoint.removesuffix(":0"))
                address = address.removesuffix(":0") + f":{port}"
            else:
                self._pull.bind(endpoint)
        except zmq.ZMQError as exc:
            self._pull.close(0)
            raise RendezvousError(f"rank {self.rank} cannot bind {address}: {exc}") from None
        self.address = address
        # An inproc sender lives in this process, often on this very loop: polling for its
        # message would only keep it from running.
        self._may_poll = not address.startswith("inproc://")
        if self.keys is None:
            self._listen_directly(address)
        self._reader = asyncio.get_running_loop().create_task(self._read())
        return address

    def offer_shared(self, capacities: dict[int, int]) -> None:
        """Offer each rank a shared-memory link of the given capacity (see shared_links.py);
        those on this host take it. Not within one process (inproc), where it buys nothing."""
        if self._may_poll:
            self.shared.job = shared.job([self.peer_addresses[r] for r in
                                          sorted(self.peer_addresses)])
            for rank, capacity in capacities.items():
                self.shared.offer(rank, capacity)

    async def settle_shared(self, ranks: list[int], timeout: float) -> None:
        """Wait until every one of `ranks` answered this rank's offer and sent its own (see
        SharedLinks.settled), so that both ends of each link know what it can do, and
        collectives that choose their algorithm by it choose alike on every rank. Part of
        start-up: RendezvousTimeout after `timeout` seconds, naming the silent ranks."""
        deadline = time.monotonic() + timeout
        while self._may_poll and not self.shared.settled(ranks):
            if time.monotonic() > deadline:
                silent = self.shared.unsettled(ranks)
                raise RendezvousTimeout(
                    f"rank {self.rank} ({self.address}): ranks {silent} "
                    f"({', '.join(self.peer_addresses[r] for r in silent)}) did not answer "
                    f"about shared memory within {timeout:g} s")
            await self.inbox.unless_failed(asyncio.sleep(1e-3))

    def set_peers(self, table: list[str]) -> None:
        """Learn every rank's address; links open on first use or through connect()."""
        self.peer_addresses.update(enumerate(table))

    def connect(self, rank: int, address: str) -> None:
        """Open the sending link to `rank` (ZeroMQ connects, and reconnects, in the background)."""
        if rank in self._push:
            return
        push = context().socket(zmq.PUSH)
        push.linger = CLOSE_LINGER_MS
        self._secure(push)
        push.connect(addresses.bind_address(addresses.check(address)))
        self._push[rank] = push
        self._push_now[rank] = zmq.Socket.shadow(push.underlying)
        self.peer_addresses[rank] = address

    async def send(self, to: int, header: Header, payload: Any = None,
                   deadline: float | None = None, writable: bool = False) -> Any:
        """Queue one message for rank `to`; the payload buffer is shared, not copied, when large.

        The returned tracker is done once ZeroMQ no longer reads the payload buffer; None
        means there is nothing to wait for: a received zmq.Frame passed on as a payload
        (ZeroMQ shares its buffer, and nobody changes it) or a copied payload. The
        header's nbytes is set to the payload's length. A shared-memory peer that waits on
        its event loop is woken (see shared.py). A send that must wait
        for room gives up with TimeoutError at `deadline` (the event loop's time).

        Large arrays go to a peer that can read this process by address (single_copy.py),
        with a Released tracker; `writable` ones always do where the peer can, and the
        peer may write into them until it releases them.
        """
        if self._closed:
            raise RingClosed(f"rank {self.rank}: endpoint is closed")
        if self.inbox.failure is not None:  # nothing more goes out once a peer is lost
            raise self.inbox.failure
        if to not in self._push:
            self.connect(to, self.peer_addresses[to])
        nbytes = 0 if payload is None else memoryview(payload).nbytes
        if header.nbytes != nbytes:
            header = header._replace(nbytes=nbytes)
        writer = self.shared.ready(to) if header.kind == Kind.DATA else None
        if writer is not None:
            by_address = writer.single_copy and isinstance(payload, np.ndarray) and \
                (writable or 0 < self.single_copy_bytes <= nbytes)
            written = writer.write(pack(header), payload, by_address, writable)
            if written is not None:
                asleep, tracker = written
                if asleep:
                    self._ring(to)
                return tracker
        link = self._links.get(to)
        if link is not None and link.ready and nbytes <= self.direct_bytes and \
                link.send(encode(header), payload):
            return None
        frames = [encode(header)] if payload is None else [encode(header), payload]
        if payload is None:
            options = {"copy": False, "track": False}
        elif self.peer_addresses[to].startswith("inproc://"):
            # inproc shares the very buffer with the receiver, who may hold it for as long as
            # it likes; a tracker would wait on the receiver, so copy.
            options = {}
        else:
            options = {"copy": False, "track": not isinstance(payload, zmq.Frame)}
        try:  # straight into ZeroMQ's queue while it has room: no future, no loop round
            return self._push_now[to].send_multipart(frames, zmq.NOBLOCK, **options)
        except zmq.Again:  # the queue is full (or has no peer yet): wait for room
            # A send waiting on a peer that takes nothing must not outlast PeerLost.
            async with asyncio.timeout_at(deadline):
                return await self.inbox.unless_failed(self._push[to].send_multipart(frames,
                                                                                    **options))

    def _ring(self, to: int) -> None:
        """Wake rank `to` to read its shared-memory link: over the direct link if one is up."""
        link = self._links.get(to)
        doorbell = encode(Header(Kind.DOORBELL, 0, 0, 0, "", 0, self.rank))
        if link is None or not link.ready or not link.send(doorbell, None):
            self.notify(to, Kind.DOORBELL)

    def notify(self, to: int, kind: Kind, seq: int = 0, payload: bytes | None = None,
               step: int = 0) -> None:
        """Send a control message at once over ZeroMQ, without waiting, even after a peer
        was lost. It is dropped when the peer's queue is full: a peer that takes nothing
        is being lost anyway."""
        if self._closed:
            return
        if to not in self._push:
            self.connect(to, self.peer_addresses[to])
        header = encode(Header(kind, seq, step, 0, "", len(payload or b""), self.rank))
        try:
            self._push_now[to].send_multipart([header] if payload is None else [header, payload],
                                              zmq.NOBLOCK)
        except zmq.Again:
            log.info("rank %d: no room to tell rank %d %s", self.rank, to, kind.name)

    async def recv(self, header_key: tuple, spin: float = 0.0,
                   despite_failure: bool = False) -> Message:
        """The message filed under `header_key` (see Header.key), waiting for it if needed
        (after polling for up to `spin` seconds: see poll). `despite_failure` waits even
        after a peer was lost (see Inbox.get)."""
        message = self.poll(header_key, spin)
        if message is not None:
            return message
        self._waiting += 1
        if self._waiting == 1:
            self.shared.sleep()  # peers ring from now on; what came meanwhile is filed
        try:
            return await self.inbox.get(header_key, despite_failure)
        finally:
            self._waiting -= 1
            if self._waiting == 0:
                self.shared.wake()

    def poll(self, header_key: tuple, spin: float = 0.0) -> Message | None:
        """The message filed under `header_key` if it is here, without yielding.

        With `spin` (seconds) the links are first polled for up to that long: a message a
        few dozen microseconds away then arrives without the wake-ups of the loop, the
        reader task and the waiter, which cost more than that. Worth it only for small,
        latency-bound collectives; never done on inproc.
        """
        if spin <= 0 or not self._may_poll or self._closed:
            return self.inbox.take(header_key)
        # Collective payloads from a peer on this host come through its ring (and only
        # those: pipeline streams stay on the sockets).
        shared = header_key[0] == Kind.DATA and header_key[4] in self.shared.readers
        if shared:
            self.shared.poll(header_key[4])  # its message is often there already
        message = self.inbox.take(header_key)
        if message is None:
            message = self._poll_for(header_key, time.perf_counter() + spin, shared)
        return message

    def _poll_for(self, key: tuple, deadline: float, shared: bool) -> Message | None:
        """Poll the links until the message is here or the deadline passed: a `shared`
        message's ring first (a few loads), the sockets (system calls) less often."""
        while True:
            for _ in range(_SHARED_POLLS if shared else 0):
                self.shared.poll(key[4])
                message = self.inbox.take(key)
                if message is not None:
                    return message
            self._file_all()
            message = self.inbox.take(key)
            if message is not None or time.perf_counter() >= deadline:
                return message

    def _file_ready(self) -> None:
        """File every message ZeroMQ holds now. Reading until there is none matters: ZeroMQ
        signals the event loop only when a message arrives at an empty queue, so a message
        left behind here would wait for the next one to be noticed. Asking for EVENTS
        finds the queue empty as a failed read would, without raising zmq.Again."""
        try:
            while self._pull_now.getsockopt(_EVENTS) & _POLLIN:
                self._file(self._pull_now.recv_multipart(zmq.NOBLOCK, copy=False))
        except zmq.ZMQError:  # the socket closed or failed: the reader task reports it
            pass

    def _file(self, frames: list[zmq.Frame]) -> None:
        if len(frames) > 2:
            self._drop(f"{len(frames)} frames in one message; at most 2 expected")
        else:
            self._deliver(frames[0].buffer, frames[1] if len(frames) == 2 else None)

    def _file_all(self) -> None:
        """File what ZeroMQ and the direct links hold now, without waiting."""
        self._file_ready()
        if self._listener is not None:
            self._listener.poll()
        self.shared.poll()

    def _deliver(self, header: bytes | memoryview, payload: Any,
                 parse: Callable[[Any], Header] = decode) -> None:
        """File one message, from ZeroMQ, a direct link or (with `parse` unpack) a
        shared-memory ring, or act on a control message."""
        try:
            message = Message(parse(header), payload)
        except ProtocolError as exc:
            return self._drop(str(exc), payload)
        h, nbytes = message.header, 0 if payload is None else len(payload)
        if h.nbytes != nbytes:
            return self._drop(f"{h.kind.name} from rank {h.sender} has {nbytes} payload bytes "
                              f"under a header of {h.nbytes}", payload)
        if isinstance(payload, HELD) and h.kind != Kind.DATA:
            return self._drop(f"{h.kind.name} from rank {h.sender} in shared memory", payload)
        if self._watchdog is not None:
            self._watchdog.heard(h.sender)
        act = self._control.get(h.kind)
        if act is None:
            self.inbox.deliver(message)
        else:
            act(message)

    def _deliver_packed(self, header: memoryview, payload: Any) -> None:
        self._deliver(header, payload, unpack)

    def _drop(self, why: str, payload: Any = None) -> None:
        discard(payload)
        log.warning("rank %d at %s dropped a message: %s", self.rank, self.address, why)

    def _secure(self, socket: zmq.Socket) -> None:
        if self.keys is not None:
            self.keys.client(socket)

    async def _read(self) -> None:
        while True:
            try:
                frames = await self._pull.recv_multipart(copy=False)
            except zmq.ZMQError as exc:
                self.inbox.close(RingClosed(f"rank {self.rank}: receive socket failed: {exc}"))
                return
            self._file(frames)

    async def close(self) -> None:
        """Stop receiving, fail pending receives with RingClosed, close every socket.

        Messages already queued are still delivered: closing the process's last endpoint
        terminates the context, which waits up to CLOSE_LINGER_MS for them to leave. Without
        that, a process that exits right after its last collective could take with it the
        small messages its neighbours still wait for.
        """
        if self._closed:
            return
        for rank in self._push:  # so that this rank's silence worries nobody
            if rank not in self.lost:
                self.notify(rank, Kind.BYE)
        self._closed = True
        self.inbox.close(RingClosed(f"rank {self.rank}: endpoint closed"))
        if self._watchdog is not None:
            await self._watchdog.stop()
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
        for link in self._links.values():  # what they still keep is written first
            link.close(CLOSE_LINGER_MS / 1000)
        if self._listener is not None:
            self._listener.close()
        self.shared.close()
        self._pull.close(0)
        if self.address and self.address.startswith("ipc://"):
            # libzmq leaves the socket file behind; nobody else will remove it.
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.address.removeprefix("ipc://"))
        for rank, push in self._push.items():  # nothing waits to reach a lost rank
            push.close(0 if rank in self.lost else None)
        await let_go()
