"""One peer's end of the ring: a bound PULL socket that receives from everyone, and a PUSH
socket per peer it sends to, all on the process's single asyncio ZeroMQ context.

PULL/PUSH keeps each link one-way and message-oriented: no identities or envelopes, and
ZeroMQ queues and reconnects underneath. Payload frames are sent with copy=False: pyzmq
copies those under its copy threshold (64 KiB) and shares memory with the rest, returning
a MessageTracker that tells when ZeroMQ has let go of the buffer (see wait_sent).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from typing import Any, Iterable

import zmq
import zmq.asyncio

from ringlib.errors import RendezvousError, RingClosed, ProtocolError

from . import addresses
from .frames import Header, decode, encode
from .inbox import Inbox, Message

log = logging.getLogger(__name__)

# How long closing waits for queued outgoing messages to be delivered.
CLOSE_LINGER_MS = 2000

_context: zmq.asyncio.Context | None = None
_open_endpoints = 0


def context() -> zmq.asyncio.Context:
    """The process's one ZeroMQ context for ringlib, created on first use and terminated
    when the last endpoint closes. It is ringlib's own, not pyzmq's global instance, so
    terminating it never waits on sockets that the application opened."""
    global _context
    if _context is None or _context.closed:
        _context = zmq.asyncio.Context()
    return _context


class Endpoint:
    """Sends to and receives from the other ranks; knows nothing about what payloads mean."""

    def __init__(self, rank: int) -> None:
        global _open_endpoints
        _open_endpoints += 1
        self.rank = rank
        self.address: str | None = None
        self.inbox = Inbox()
        self._pull = context().socket(zmq.PULL)
        self._pull.linger = 0
        self._push: dict[int, zmq.asyncio.Socket] = {}
        self.peer_addresses: dict[int, str] = {}
        self._reader: asyncio.Task | None = None
        self._closed = False

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
        self._reader = asyncio.get_running_loop().create_task(self._read())
        return address

    def set_peers(self, table: list[str]) -> None:
        """Learn every rank's address; links open on first use or through connect()."""
        self.peer_addresses.update(enumerate(table))

    def connect(self, rank: int, address: str) -> None:
        """Open the sending link to `rank` (ZeroMQ connects, and reconnects, in the background)."""
        if rank in self._push:
            return
        push = context().socket(zmq.PUSH)
        push.linger = CLOSE_LINGER_MS
        push.connect(addresses.bind_address(addresses.check(address)))
        self._push[rank] = push
        self.peer_addresses[rank] = address

    async def send(self, to: int, header: Header, payload: Any = None) -> zmq.MessageTracker:
        """Queue one message for rank `to`; the payload buffer is shared, not copied, when large.

        The returned tracker is done once ZeroMQ no longer reads the payload buffer; None
        means there is nothing to wait for: a received zmq.Frame passed on as a payload
        (ZeroMQ shares its buffer, and nobody changes it) or a copied payload.
        """
        if self._closed:
            raise RingClosed(f"rank {self.rank}: endpoint is closed")
        if to not in self._push:
            self.connect(to, self.peer_addresses[to])
        if payload is None:
            return await self._push[to].send(encode(header), copy=False, track=False)
        if self.peer_addresses[to].startswith("inproc://"):
            # inproc shares the very buffer with the receiver, who may hold it for as long as
            # it likes; a tracker would wait on the receiver, so copy.
            return await self._push[to].send_multipart([encode(header), payload])
        track = not isinstance(payload, zmq.Frame)
        return await self._push[to].send_multipart([encode(header), payload], copy=False,
                                                   track=track)

    async def recv(self, header_key: tuple) -> Message:
        """The message filed under `header_key` (see Header.key), waiting for it if needed."""
        return await self.inbox.get(header_key)

    async def _read(self) -> None:
        while True:
            try:
                frames = await self._pull.recv_multipart(copy=False)
            except zmq.ZMQError as exc:
                self.inbox.fail(RingClosed(f"rank {self.rank}: receive socket failed: {exc}"))
                return
            try:
                self.inbox.deliver(_message(frames))
            except ProtocolError as exc:
                log.warning("rank %d at %s dropped a message: %s", self.rank, self.address, exc)

    async def close(self) -> None:
        """Stop receiving, fail pending receives with RingClosed, close every socket.

        Messages already queued are still delivered: closing the process's last endpoint
        terminates the context, which waits up to CLOSE_LINGER_MS for them to leave. Without
        that, a process that exits right after its last collective could take with it the
        small messages its neighbours still wait for.
        """
        global _open_endpoints
        if self._closed:
            return
        self._closed = True
        self.inbox.fail(RingClosed(f"rank {self.rank}: endpoint closed"))
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
        self._pull.close(0)
        if self.address and self.address.startswith("ipc://"):
            # libzmq leaves the socket file behind; nobody else will remove it.
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.address.removeprefix("ipc://"))
        for push in self._push.values():
            push.close()
        _open_endpoints -= 1
        if _open_endpoints == 0 and _context is not None:
            await asyncio.get_running_loop().run_in_executor(None, _context.term)


def _message(frames: list[zmq.Frame]) -> Message:
    if len(frames) > 2:
        raise ProtocolError(f"{len(frames)} frames in one message; at most 2 expected")
    payload = frames[1] if len(frames) == 2 else None
    return Message(decode(frames[0].buffer), payload)


async def wait_sent(trackers: Iterable[zmq.MessageTracker]) -> None:
    """Wait until ZeroMQ has let go of every tracked buffer, so it may be changed or freed.

    Trackers are set from ZeroMQ's own thread; polling them costs nothing when they are done
    already, which is the usual case for all but the last messages of a collective. The
    caller's deadline (a collective's timeout) bounds the wait.
    """
    pending = [t for t in trackers if not t.done]
    delay = 0.0
    while pending:
        await asyncio.sleep(delay)
        delay = min(2 * delay or 20e-6, 2e-3)
        pending = [t for t in pending if not t.done]
