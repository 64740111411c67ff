"""Direct links: small messages between two peers over a plain stream socket, beside ZeroMQ.

ZeroMQ hands every message to its I/O thread on the way out and again on the way in. On a
small message those two thread wake-ups cost more than everything else a collective does
(docs/benchmark-notes.md: an 8-byte exchange takes 120-150 us through ZeroMQ and 21 us through a
plain socket on the same loopback). A direct link is a TCP connection (a Unix socket for
ipc peers) from a sender to a receiver, on which the sender writes each frame itself,
from the event loop's thread, and the receiver reads it on its event loop or while it
polls (Endpoint.recv's spin). Only messages up to a size limit take it; ZeroMQ keeps the
large ones and their zero-copy sends, and carries everything while no link is up.

A frame is a 12-byte prefix, the msgpack header, then the payload:
    [magic u32][header length u32][payload length + 1 u32, 0 for none]
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import socket
import struct
from typing import Any, Callable

import zmq

from ringlib.errors import ProtocolError, RendezvousError

from . import addresses

log = logging.getLogger(__name__)

PREFIX = struct.Struct("<III")
MAGIC = 0x524C4431          # "RLD1": a foreign client is refused on its first bytes
MAX_HEADER = 1024
MAX_PAYLOAD = 1 << 20       # larger messages are refused: never a link's business
READ_BYTES = 1 << 18


def listen_address(peer_address: str) -> str | None:
    """Where to listen for direct links beside a ZeroMQ address: a free port on the same
    host for tcp, a socket file beside it for ipc; None for inproc (same process)."""
    if peer_address.startswith("tcp://"):
        host, _ = addresses.split_host_port(peer_address)
        return peer_address.rsplit(":", 1)[0] + ":0" if host != "*" else None
    if peer_address.startswith("ipc://"):
        path = peer_address.removeprefix("ipc://") + ".d"
        return f"ipc://{path}" if len(path.encode()) < 108 else None
    return None


def remove_socket_files(peer_address: str) -> None:
    """Remove a lost ipc peer's socket files (ZeroMQ's and its direct link's), which a
    killed process leaves behind. Every survivor tries; the first one succeeds."""
    for where in (peer_address, listen_address(peer_address)):
        if where and where.startswith("ipc://"):
            with contextlib.suppress(OSError):
                os.unlink(where.removeprefix("ipc://"))


def offered_by(offer: str, peer_address: str) -> bool:
    """Whether `offer` is where the peer at `peer_address` would listen for direct links:
    its own host (any port), or its own socket file. An offer that points elsewhere would
    send the peer's messages to a third party; it is refused."""
    expected = listen_address(peer_address)
    if expected is None or not offer.startswith(expected.split("://")[0] + "://"):
        return False
    if expected.startswith("ipc://"):
        return offer == expected
    try:
        port = addresses.split_host_port(offer)[1]
    except RendezvousError:
        return False
    return offer == expected.rsplit(":", 1)[0] + f":{port}"


def _socket_for(address: str) -> tuple[socket.socket, Any]:
    if address.startswith("ipc://"):
        return socket.socket(socket.AF_UNIX, socket.SOCK_STREAM), address.removeprefix("ipc://")
    host, port = addresses.split_host_port(addresses.bind_address(address), bind=True)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock, (host, port)


class Listener:
    """Accepts direct links on the event loop and reads their frames into `deliver`; a
    link cut off amid a frame goes to `drop(why)`."""

    def __init__(self, address: str, deliver: Callable[[bytes, zmq.Frame | None], None],
                 drop: Callable[[str], None] = log.warning) -> None:
        self._sock, where = _socket_for(address)
        self._deliver, self._drop = deliver, drop
        self._loop = asyncio.get_running_loop()
        self.readers: list[Reader] = []
        try:
            self._sock.bind(where)
            self._sock.listen(64)
        except OSError:
            self._sock.close()
            raise
        self._sock.setblocking(False)
        self._path = where if isinstance(where, str) else None
        bound = self._sock.getsockname()
        self.address = address if self._path else \
            f"{address.rsplit(':', 1)[0]}:{bound[1]}"
        self._loop.add_reader(self._sock.fileno(), self._accept)

    def _accept(self) -> None:
        with contextlib.suppress(BlockingIOError, InterruptedError):
            while True:
                conn, _ = self._sock.accept()
                conn.setblocking(False)
                if conn.family != socket.AF_UNIX:
                    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                self.readers.append(Reader(conn, self._deliver, self._loop, self._forget,
                                           self._drop))

    def _forget(self, reader: Reader) -> None:
        self.readers.remove(reader)

    def poll(self) -> None:
        """Read whatever every link holds now, without waiting."""
        for reader in list(self.readers):
            reader.read_ready()

    def close(self) -> None:
        self._loop.remove_reader(self._sock.fileno())
        for reader in list(self.readers):
            reader.close()
        self._sock.close()
        if self._path:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._path)


class Reader:
    """One accepted link: bytes in, whole frames out."""

    def __init__(self, conn: socket.socket, deliver: Callable, loop: asyncio.AbstractEventLoop,
                 on_close: Callable[[Reader], None],
                 drop: Callable[[str], None] = log.warning) -> None:
        self._conn, self._deliver, self._loop, self._on_close = conn, deliver, loop, on_close
        self._drop = drop
        self._buffer = bytearray()
        self._closed = False
        loop.add_reader(conn.fileno(), self.read_ready)

    def read_ready(self) -> None:
        """Take every byte the socket holds, then hand on each whole frame."""
        try:
            while True:
                chunk = self._conn.recv(READ_BYTES)
                if not chunk:
                    return self._close_with("the peer closed the link")
                self._buffer += chunk
                if len(chunk) < READ_BYTES:
                    break
        except (BlockingIOError, InterruptedError):
            pass
        except OSError as exc:
            return self._close_with(f"link failed: {exc}")
        try:
            self._frames()
        except ProtocolError as exc:  # a stream out of step cannot be trusted any further
            self._close_with(str(exc))

    def _frames(self) -> None:
        """Hand on every whole frame the buffer holds, and forget it (junk raises
        ProtocolError after the frames before it)."""
        buf, start = self._buffer, 0
        try:
            with memoryview(buf) as view:  # slices of a view copy once, of a bytearray twice
                while len(buf) - start >= PREFIX.size:
                    magic, header_len, payload_len = PREFIX.unpack_from(buf, start)
                    if magic != MAGIC or header_len > MAX_HEADER or \
                            payload_len > MAX_PAYLOAD + 1:
                        raise ProtocolError("not a ringlib direct-link frame: "
                                            f"{bytes(view[start:start + PREFIX.size])!r}")
                    body = start + PREFIX.size
                    end = body + header_len + max(payload_len - 1, 0)
                    if len(buf) < end:
                        break
                    payload = zmq.Frame(bytes(view[body + header_len:end])) \
                        if payload_len else None
                    self._deliver(bytes(view[body:body + header_len]), payload)
                    start = end
        finally:
            del buf[:start]

    def _close_with(self, why: str) -> None:
        """Close the link: hand on every whole frame that came before, and drop the rest."""
        with contextlib.suppress(ProtocolError):
            self._frames()
        if not self._closed:
            if self._buffer:
                self._drop(f"direct link closed with {len(self._buffer)} bytes of an "
                           f"unfinished frame: {why}")
            self.close()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._loop.remove_reader(self._conn.fileno())
        self._conn.close()
        self._on_close(self)


class Writer:
    """The sending end of a link to one peer. It connects without blocking; until it is
    connected (and for good, if it cannot connect) `ready` is False and ZeroMQ carries.
    Frames the socket has not taken whole when the link fails go to `resend(header,
    payload)`, to travel another way: the receiver drops the part it got."""

    def __init__(self, address: str, resend: Callable[[bytes, bytes | None], None]) -> None:
        self.address = address
        self.ready = False
        self._loop = asyncio.get_running_loop()
        self._resend = resend
        self._sock, where = _socket_for(address)
        self._sock.setblocking(False)
        self._pending: collections.deque[bytes] = collections.deque()  # whole frames
        self._written = 0  # bytes of the first pending frame the socket took already
        self._closed = False
        err = self._sock.connect_ex(where)
        if err == 0:
            self.ready = True
        else:
            self._loop.add_writer(self._sock.fileno(), self._connected)

    def _connected(self) -> None:
        self._loop.remove_writer(self._sock.fileno())
        err = self._sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            log.info("no direct link to %s (%s); ZeroMQ carries", self.address,
                     os.strerror(err))
            self.close()
        else:
            self.ready = True

    def send(self, header: bytes, payload: Any) -> bool:
        """Write one frame; what the socket does not take now is kept and written when it
        can be, so the caller may change `payload` as soon as this returns. False if the
        link has failed (it is closed then), and the caller must send another way."""
        view = None if payload is None else memoryview(payload).cast("B")
        prefix = PREFIX.pack(MAGIC, len(header), 0 if view is None else view.nbytes + 1)
        parts = [prefix, header] if view is None else [prefix, header, view]
        if self._pending:
            self._pending.append(b"".join(parts))
            return True
        try:
            sent = self._sock.sendmsg(parts)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError as exc:
            log.warning("direct link to %s failed: %s; ZeroMQ carries", self.address, exc)
            self.close()
            return False
        if sent < len(prefix) + len(header) + (0 if view is None else view.nbytes):
            self._pending.append(b"".join(parts))
            self._written = sent
            self._loop.add_writer(self._sock.fileno(), self._flush)
        return True

    def _flush(self) -> None:
        while self._pending:
            frame = self._pending[0]
            try:
                self._written += self._sock.send(memoryview(frame)[self._written:])
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.warning("direct link to %s failed with %d frames unsent: %s; ZeroMQ "
                            "carries them", self.address, len(self._pending), exc)
                return self.close()
            if self._written < len(frame):
                return
            self._pending.popleft()
            self._written = 0
        self._loop.remove_writer(self._sock.fileno())

    def _hand_back(self) -> None:
        """Give every frame the socket has not taken whole to `resend`."""
        while self._pending:
            frame = memoryview(self._pending.popleft())
            _, header_len, payload_len = PREFIX.unpack_from(frame)
            body = PREFIX.size + header_len
            self._resend(bytes(frame[PREFIX.size:body]),
                         bytes(frame[body:]) if payload_len else None)
        self._written = 0

    def close(self, linger: float = 0.0) -> None:
        """Close the link; frames still kept are first written, waiting up to `linger`
        seconds (the event loop waits too: this is for when the ring closes), and what is
        left then goes to `resend`."""
        if self._closed:
            return
        self._closed = True
        self.ready = False
        self._loop.remove_writer(self._sock.fileno())
        if self._pending and linger > 0:
            try:
                self._sock.settimeout(linger)
                while self._pending:
                    self._sock.sendall(memoryview(self._pending[0])[self._written:])
                    self._pending.popleft()
                    self._written = 0
            except OSError as exc:
                log.warning("direct link to %s closed with %d frames unsent: %s; ZeroMQ "
                            "carries them", self.address, len(self._pending), exc)
        self._sock.close()
        self._hand_back()
