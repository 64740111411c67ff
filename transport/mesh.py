"""The mesh: a plain TCP connection between every two ranks of a small ring, which the
thread that runs a collective drives itself.

Through ZeroMQ, and through the direct links the event loop reads, a small collective of
a blocking ring costs two thread wake-ups more than the exchange itself: the caller hands
it to the loop's thread and waits to be handed the result (about 100 us each on a small
VM: docs/benchmark-notes.md). The mesh's sockets are never registered with the event
loop: the caller's thread writes its frame to every peer and sleeps in poll(2) on their
sockets, with the GIL released, until their frames are there; on the event loop the same
collective waits with add_reader. Either way one thread runs it, start to end.

A frame is [seq u64][signature hash u64][payload bytes u32] and the payload. Frames on a
connection come in the order their collectives were numbered; one of an earlier
collective (one that failed here) is skipped, one of a later collective kept for it. A
large all-reduce streams its frame's payload (collectives/mesh_ring_allreduce.py): the
sender writes it piece by piece as pieces become ready (write()), the receiver reads it
straight where it goes (header(), then read_into()), with no copy in between.
"""

from __future__ import annotations

import asyncio
import collections
import hmac
import select
import socket
import struct
from typing import Any

from ringlib.errors import PeerLost, ProtocolError

FRAME = struct.Struct("<QQI")
HELLO = struct.Struct("<II64s")  # magic, the connecting rank, its ring token
MAGIC = 0x524C4D31               # "RLM1"
READ_BYTES = 1 << 16


class LinkBroken(PeerLost):
    """The mesh link to a peer failed: `why`, as the socket said."""

    def __init__(self, message: str, rank: int, address: str, why: str) -> None:
        super().__init__(message, rank, address)
        self.why = why


class Link:
    """One rank's end of its connection with one peer."""

    def __init__(self, sock: socket.socket, peer: int, address: str) -> None:
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock, self.peer, self.address = sock, peer, address
        self.fd = sock.fileno()
        self._out: collections.deque[memoryview] = collections.deque()  # not taken yet
        self._in = bytearray()
        self._kept: dict[int, tuple[int, bytes]] = {}  # seq -> (hash, payload) come early
        self._stream, self._unread = memoryview(b""), 0  # a streamed payload: read, to read
        self._skip = 0  # bytes still to come of a streamed payload given up on

    def send(self, seq: int, sig_hash: int, payload: memoryview) -> None:
        """Write one frame, keeping what the socket does not take now (flush())."""
        parts = [FRAME.pack(seq, sig_hash, payload.nbytes), payload]
        if not self._out:
            try:
                sent = self.sock.sendmsg(parts)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError as exc:
                raise self._broken(exc) from None
            if sent == FRAME.size + payload.nbytes:
                return
            self._out.append(memoryview(b"".join(parts))[sent:])
        else:
            self._out.append(memoryview(b"".join(parts)))

    def send_header(self, seq: int, sig_hash: int, nbytes: int) -> None:
        """Begin a frame whose `nbytes` of payload follow by write()."""
        self._out.append(memoryview(FRAME.pack(seq, sig_hash, nbytes)))
        self.flush()

    def write(self, data: memoryview) -> int:
        """Write what the socket takes now of `data`, a streamed frame's payload, once all
        kept before it is out; how many bytes it took."""
        self.flush()
        if self._out:
            return 0
        try:
            return self.sock.send(data)
        except (BlockingIOError, InterruptedError):
            return 0
        except OSError as exc:
            raise self._broken(exc) from None

    def pad(self, nbytes: int) -> None:
        """End a streamed payload that will not be written whole with `nbytes` zeros, so
        that the frames after it are read as frames."""
        if nbytes:
            self._out.append(memoryview(bytes(nbytes)))
            self.flush()

    def abandon(self) -> None:
        """Skip the rest of a streamed payload this rank stops reading."""
        self._skip += self._unread
        self._stream, self._unread = memoryview(b""), 0

    def header(self, seq: int) -> tuple[int, int] | None:
        """(hash, payload bytes) of the peer's frame of `seq` once its header is here, its
        payload to be read with read_into(); None until then. PeerLost once the link
        broke and all that came before is taken."""
        self._kept = {s: frame for s, frame in self._kept.items() if s >= seq}
        found = self._kept.pop(seq, None)
        while found is None:
            held = len(self._in)
            if held >= FRAME.size:
                theirs, sig_hash, nbytes = FRAME.unpack_from(self._in)
                if theirs == seq:
                    head = self._in[FRAME.size:FRAME.size + nbytes]
                    self._stream, self._unread = memoryview(bytes(head)), nbytes - len(head)
                    del self._in[:FRAME.size + len(head)]
                    return sig_hash, nbytes
                found = self._parse(seq)  # other collectives' frames, skipped or kept
                if found is not None or len(self._in) < held:
                    continue
                broken = self._read()  # the rest of such a frame
            elif self._skip:
                broken = self._read()
            else:  # no further than the header: the payload is read where it goes
                broken = self._read(FRAME.size - held, once=True)
            if len(self._in) == held:
                if broken is not None:
                    raise self._broken(broken)
                return None
        sig_hash, payload = found  # it came whole while an earlier collective read the link
        self._stream, self._unread = memoryview(payload), 0
        return sig_hash, len(payload)

    def read_into(self, into: memoryview) -> int:
        """Read what is here now of the streamed payload into `into`: how many bytes."""
        if self._stream.nbytes:
            n = min(self._stream.nbytes, into.nbytes)
            into[:n] = self._stream[:n]
            self._stream = self._stream[n:]
            return n
        want = min(into.nbytes, self._unread)
        if not want:
            return 0
        try:
            n = self.sock.recv_into(into, want)
        except (BlockingIOError, InterruptedError):
            return 0
        except OSError as exc:
            raise self._broken(exc) from None
        if n == 0:
            raise self._broken("it closed the connection")
        self._unread -= n
        return n

    @property
    def unsent(self) -> bool:
        """Whether part of a frame waits to be written (flush())."""
        return bool(self._out)

    def flush(self) -> None:
        """Write what the socket takes of what is kept."""
        while self._out:
            try:
                sent = self.sock.send(self._out[0])
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                raise self._broken(exc) from None
            if sent < len(self._out[0]):
                self._out[0] = self._out[0][sent:]  # a view: nothing is copied
                return
            self._out.popleft()

    def take(self, seq: int) -> tuple[int, bytes] | None:
        """(hash, payload) of the peer's frame of collective `seq`, if it is here: what
        the socket holds is read first, without waiting. PeerLost once the link broke
        and all that came before is taken."""
        if self._kept:  # frames of collectives before `seq` will never be asked for
            self._kept = {s: frame for s, frame in self._kept.items() if s >= seq}
        found = self._kept.pop(seq, None) or self._parse(seq)
        if found is None:
            broken = self._read()
            found = self._parse(seq)
            if found is None and broken is not None:
                raise self._broken(broken)
        return found

    def _parse(self, seq: int) -> tuple[int, bytes] | None:
        """The frame of `seq` among those read, skipping earlier ones, keeping later ones."""
        while len(self._in) >= FRAME.size:
            theirs, sig_hash, nbytes = FRAME.unpack_from(self._in)
            end = FRAME.size + nbytes
            if len(self._in) < end:
                break
            payload = bytes(self._in[FRAME.size:end])
            del self._in[:end]
            if theirs == seq:
                return sig_hash, payload
            if theirs > seq:
                self._kept[theirs] = (sig_hash, payload)
        return None

    def _read(self, most: int = READ_BYTES, once: bool = False) -> str | None:
        """Read what the socket holds (only `most` bytes, with `once`); why the link
        broke, if it did."""
        while True:
            try:
                chunk = self.sock.recv(most)
            except (BlockingIOError, InterruptedError):
                return None
            except OSError as exc:
                return str(exc)
            if not chunk:
                return "it closed the connection"
            self._in += chunk
            if self._skip:
                dropped = min(self._skip, len(self._in))
                del self._in[:dropped]
                self._skip -= dropped
            if once or len(chunk) < most:
                return None

    def _broken(self, why: Any) -> LinkBroken:
        return LinkBroken(f"rank {self.peer} ({self.address}): its mesh link broke: {why}",
                          self.peer, self.address, str(why))

    def close(self) -> None:
        self.sock.close()


class Mesh:
    """One rank's links to every peer of its ring, by peer rank."""

    def __init__(self, links: dict[int, Link]) -> None:
        self.links = links

    def close(self) -> None:
        """Close every link (once no collective waits on them: MeshPath.close)."""
        for link in self.links.values():
            link.close()


Waits = list[tuple[Link, bool, bool]]  # (link, to read, to write)


def wait_here(waits: Waits, seconds: float) -> None:
    """Sleep until one of `waits` is ready, or for `seconds`, on this thread: in poll(2),
    the GIL released. A signal's handler (Ctrl-C) raises out of it."""
    poller = select.poll()
    for link, reading, writing in waits:
        poller.register(link.fd, (select.POLLIN if reading else 0) |
                        (select.POLLOUT if writing else 0))
    poller.poll(seconds * 1000)


async def wait_on_loop(loop: asyncio.AbstractEventLoop, waits: Waits, seconds: float) -> None:
    """Wait on the event loop until one of `waits` is ready, or for `seconds`."""
    ready = loop.create_future()
    wake = lambda: ready.done() or ready.set_result(None)  # noqa: E731
    for link, reading, writing in waits:
        if reading:
            loop.add_reader(link.fd, wake)
        if writing:
            loop.add_writer(link.fd, wake)
    try:
        await asyncio.wait_for(ready, seconds)
    except TimeoutError:
        pass
    finally:
        for link, reading, writing in waits:
            if reading:
                loop.remove_reader(link.fd)
            if writing:
                loop.remove_writer(link.fd)


def hello(rank: int, token: str) -> bytes:
    """The first bytes a rank writes on a mesh connection it opens: its rank and token."""
    return HELLO.pack(MAGIC, rank, token.encode())


def greeted_by(data: bytes, tokens: dict[int, str]) -> int:
    """The rank a connection's first bytes name, one of `tokens`' and with its token."""
    magic, rank, token = HELLO.unpack(data)
    if magic != MAGIC or rank not in tokens or \
            not hmac.compare_digest(tokens[rank].encode(), token.rstrip(b"\0")):
        raise ProtocolError(f"a mesh connection greeted as rank {rank} without its token")
    return rank


async def connect(loop: asyncio.AbstractEventLoop, host: str, port: int) -> socket.socket:
    """A TCP connection to host:port, made on the event loop."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        await loop.sock_connect(sock, (host, port))
    except BaseException:
        sock.close()
        raise
    return sock


async def receive_exactly(loop: asyncio.AbstractEventLoop, sock: socket.socket,
                          nbytes: int) -> bytes:
    """The first `nbytes` a connection brings, read on the event loop."""
    data = bytearray()
    while len(data) < nbytes:
        chunk = await loop.sock_recv(sock, nbytes - len(data))
        if not chunk:
            raise ProtocolError("a mesh connection closed before its greeting")
        data += chunk
    return bytes(data)
