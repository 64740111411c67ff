"""The ZeroMQ links: a bound PULL socket that receives from every peer, and a PUSH socket
per peer to send to, all on the process's single asyncio ZeroMQ context.

PULL/PUSH keeps each link one-way and message-oriented: no identities or envelopes, and
ZeroMQ queues and reconnects underneath. Payload frames are sent with copy=False: pyzmq
copies those under its copy threshold (64 KiB) and shares memory with the rest, returning
a MessageTracker that tells when ZeroMQ has let go of the buffer (see trackers.py). With
CurveZMQ keys (security.py) every link is authenticated and encrypted.

ZeroMQ carries everything that no other link takes: start-up, control messages, large
payloads between hosts, and whatever a direct or shared-memory link cannot take now.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from typing import Any, Awaitable, Callable

import zmq
import zmq.asyncio

from ringlib.errors import RendezvousError, RingClosed, Unauthorized

from . import addresses
from .context import context, gate, hold, let_go
from .roster import Roster
from .security import Handshakes, Keys

log = logging.getLogger(__name__)

# How long closing waits for queued outgoing messages to be delivered.
CLOSE_LINGER_MS = 2000
CLOSE_LINGER_S = CLOSE_LINGER_MS / 1000
# Plain ints: flag enums make `events & POLLIN` cost microseconds on the polling path.
_EVENTS, _POLLIN = int(zmq.EVENTS), int(zmq.POLLIN)


class ZmqLinks:
    """One rank's ZeroMQ sockets. Every message received goes to `deliver(frames)`; a
    receive socket that fails goes to `broken(exc)`."""

    def __init__(self, roster: Roster, keys: Keys | None,
                 deliver: Callable[[list[zmq.Frame]], None],
                 broken: Callable[[BaseException], None]) -> None:
        self._roster, self.keys = roster, keys
        self._deliver, self._broken = deliver, broken
        self._pull = context().socket(zmq.PULL)
        self._pull.linger = 0
        if keys is not None:
            try:
                keys.server(self._pull)
            except zmq.ZMQError as exc:
                self._pull.close(0)
                raise Unauthorized(f"rank {roster.rank}: ZeroMQ refused the CurveZMQ keys: "
                                   f"{exc}") from None
            gate().admit(keys)
        self._handshakes: Handshakes | None = None  # see bind()
        hold()  # nothing below fails: close() lets go
        # The same socket as a plain one, for reads that do not yield to the event loop.
        self._pull_now = zmq.Socket.shadow(self._pull.underlying)
        self._push: dict[int, zmq.asyncio.Socket] = {}
        self._push_now: dict[int, zmq.Socket] = {}  # the same sockets, plain
        self._push_to: dict[int, str] = {}  # where each is connected
        self._waiting: dict[int, int] = {}  # rank -> sends waiting for room on its queue
        self._reader: asyncio.Task | None = None

    def bind(self, address: str, also: str | None = None) -> str:
        """Bind the receiving socket at `address` (tcp port 0 picks a free port), and at
        `also` too if given (rank 0's seed, where only the joins come), start reading it,
        and return the address the other peers should connect to."""
        if also is not None:
            self._bind(also)
        address = self._bind(address)
        self._reader = asyncio.get_running_loop().create_task(self._read())
        if self.keys is not None:
            self._handshakes = Handshakes(self._pull, f"rank {self._roster.rank} ({address})")
        return address

    def _bind(self, address: str) -> str:
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
            raise RendezvousError(f"rank {self._roster.rank} cannot bind {address}: {exc}") \
                from None
        return address

    def connect(self, rank: int) -> None:
        """Open the sending link to `rank` at its address in the roster (ZeroMQ connects,
        and reconnects, in the background). A link already open to another address (the
        seed a rank joined at) is closed first, its queue still delivered."""
        address = self._roster.peers[rank]
        if rank in self._push:
            if self._push_to[rank] == address:
                return
            self._push.pop(rank).close()
            self._push_now.pop(rank)
        push = context().socket(zmq.PUSH)
        push.linger = CLOSE_LINGER_MS
        self.secure(push)
        push.connect(addresses.bind_address(addresses.check(address)))
        self._push[rank], self._push_to[rank] = push, address
        self._push_now[rank] = zmq.Socket.shadow(push.underlying)

    @property
    def connected(self) -> list[int]:
        """The ranks this rank has a sending link to."""
        return list(self._push)

    def secure(self, socket: zmq.Socket) -> None:
        """Make a sending socket present the ring's keys, if it has any."""
        if self.keys is not None:
            self.keys.client(socket)

    async def send(self, to: int, frames: list[Any], deadline: float | None,
                   unless_failed: Callable[[Awaitable[Any]], Awaitable[Any]]) -> Any:
        """Queue `frames` (a header, and a payload or none) for rank `to`; return the
        payload's tracker, or None when there is nothing to wait for (no payload, a copied
        one, or a received zmq.Frame passed on, whose buffer nobody changes). A send that
        must wait for room gives up with TimeoutError at `deadline` (the loop's time), or
        with what `unless_failed` raises (a lost peer)."""
        self.connect(to)
        if len(frames) == 1:
            options = {"copy": False, "track": False}
        elif self._roster.peers[to].startswith("inproc://"):
            # inproc shares the very buffer with the receiver, who may hold it for as long as
            # it likes; a tracker would wait on the receiver, so copy.
            options = {}
        else:
            options = {"copy": False, "track": not isinstance(frames[1], zmq.Frame)}
        try:  # straight into ZeroMQ's queue while it has room: no future, no loop round
            return self._push_now[to].send_multipart(frames, zmq.NOBLOCK, **options)
        except zmq.Again:  # the queue is full (or has no peer yet): wait for room
            # A send waiting on a peer that takes nothing must not outlast PeerLost.
            self._waiting[to] = self._waiting.get(to, 0) + 1
            try:
                async with asyncio.timeout_at(deadline):
                    return await unless_failed(self._push[to].send_multipart(frames,
                                                                             **options))
            finally:
                self._waiting[to] -= 1

    def waits_for_room(self, rank: int) -> bool:
        """Whether a send waits for room on `rank`'s queue now."""
        return self._waiting.get(rank, 0) > 0

    def send_now(self, to: int, frames: list[Any]) -> bool:
        """Queue a small message without waiting, copied; False if the peer's queue is full."""
        self.connect(to)
        try:
            self._push_now[to].send_multipart(frames, zmq.NOBLOCK)
        except zmq.Again:
            return False
        return True

    def file_ready(self) -> None:
        """Deliver every message ZeroMQ holds now. Reading until there is none matters:
        ZeroMQ signals the event loop only when a message arrives at an empty queue, so a
        message left behind here would wait for the next one to be noticed. Asking for
        EVENTS finds the queue empty as a failed read would, without raising zmq.Again."""
        try:
            while self._pull_now.getsockopt(_EVENTS) & _POLLIN:
                self._deliver(self._pull_now.recv_multipart(zmq.NOBLOCK, copy=False))
        except zmq.ZMQError:  # the socket closed or failed: the reader task reports it
            pass

    async def _read(self) -> None:
        while True:
            try:
                frames = await self._pull.recv_multipart(copy=False)
            except zmq.ZMQError as exc:
                self._broken(RingClosed(f"rank {self._roster.rank}: receive socket failed: "
                                        f"{exc}"))
                return
            self._deliver(frames)

    async def stop_reading(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)

    async def close(self, lost: Any) -> None:
        """Close every socket; what is queued for a rank not in `lost` is still delivered:
        closing the process's last endpoint terminates the context, which waits up to
        CLOSE_LINGER_MS for it. Without that, a process that exits right after its last
        collective could take with it the small messages its neighbours still wait for."""
        await self.stop_reading()
        if self._handshakes is not None:
            await self._handshakes.close()
        self._pull.close(0)
        address = self._roster.address
        if address and address.startswith("ipc://"):
            # libzmq leaves the socket file behind; nobody else will remove it.
            with contextlib.suppress(FileNotFoundError):
                os.unlink(address.removeprefix("ipc://"))
        for rank, push in self._push.items():  # nothing waits to reach a lost rank
            push.close(0 if rank in lost else None)
        await let_go()
