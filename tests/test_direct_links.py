"""Direct links beside ZeroMQ (transport/direct.py), between real endpoints on real
sockets: small messages take them once they are up, large ones stay on ZeroMQ, bytes the
socket cannot take at once are kept and written later, and a stranger on the link's port
is cut off without harm."""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time

import numpy as np
import pytest

from ringlib.transport import Endpoint, Header, Kind, direct, frames
from ringlib.transport.addresses import local_addresses

pytestmark = pytest.mark.timeout(60)


def header(item: int, nbytes: int, sender: int) -> Header:
    return frames.stream(0, item, 0, "uint8", sender, nbytes)


def bound_pair(addresses: list[str]) -> list[Endpoint]:
    """Ranks 0 and 1, bound at `addresses`, each knowing the other's."""
    ends = [Endpoint(0), Endpoint(1)]
    for end, address in zip(ends, addresses):
        end.bind(address)
        end.set_peers(addresses)
    for end, other in zip(ends, reversed(ends)):  # as their greeting would tell them
        end.roster.tokens[other.rank] = other.roster.token
    return ends


async def linked_pair(addresses: list[str]) -> tuple[Endpoint, Endpoint]:
    """Two endpoints that offered each other direct links and have them up."""
    ends = bound_pair(addresses)
    for end in ends:
        await end.offer_links([1 - end.rank])
    async with asyncio.timeout(10):
        while [e.links()["direct"] for e in ends] != [[1], [0]]:
            await asyncio.sleep(0.005)
    return ends[0], ends[1]


async def closed_by_peer(sock: socket.socket) -> bool:
    """Wait, without blocking the event loop, until the other end closes `sock`."""
    sock.setblocking(False)
    async with asyncio.timeout(5):
        while True:
            try:
                if sock.recv(4096) == b"":
                    return True
            except BlockingIOError:
                await asyncio.sleep(0.005)
            except ConnectionResetError:
                return True


@pytest.fixture(params=["tcp", "ipc"])
def addresses(request, tmp_path) -> list[str]:
    return local_addresses(2, request.param, str(tmp_path))


async def test_small_and_large_messages_arrive_intact_whichever_way_they_travel(addresses, rng):
    a, b = await linked_pair(addresses)
    try:
        a.direct_bytes = 4096
        sizes = [0, 1, 4096, 4097, 300_000, 7]  # both sides of the limit, in one stream
        payloads = [rng.integers(0, 256, n, dtype=np.uint8) for n in sizes]
        for seq, payload in enumerate(payloads):
            await a.send(1, header(seq, payload.size, 0), payload)
        for seq, payload in enumerate(payloads):
            message = await b.recv(header(seq, payload.size, 0).key, spin=1e-4)
            assert message.header == header(seq, payload.size, 0)
            assert np.array_equal(np.frombuffer(message.payload.buffer, np.uint8), payload)
    finally:
        await a.close()
        await b.close()


async def test_what_the_socket_cannot_take_at_once_is_written_later_in_order(addresses, rng):
    a, b = await linked_pair(addresses)
    try:
        # 64 MB of 200 KB messages sent without yielding: far more than a socket buffer.
        payloads = [rng.integers(0, 256, 200_000, dtype=np.uint8) for _ in range(320)]
        originals = [p.copy() for p in payloads]
        for seq, payload in enumerate(payloads):
            assert await a.send(1, header(seq, payload.size, 0), payload) is None  # copied
            payload[:] = 0  # so the caller may reuse its buffer at once
        for seq, original in enumerate(originals):
            message = await b.recv(header(seq, original.size, 0).key)
            assert np.array_equal(np.frombuffer(message.payload.buffer, np.uint8), original)
        assert len(b.inbox) == 0
    finally:
        await a.close()
        await b.close()


async def test_a_stranger_on_the_link_port_is_cut_off_and_the_link_carries_on(caplog):
    a, b = await linked_pair(local_addresses(2, "tcp", ""))
    try:
        host, port = b.direct.listener.address.removeprefix("tcp://").rsplit(":", 1)
        with socket.create_connection((host, int(port))) as stranger, \
                caplog.at_level(logging.WARNING, logger="ringlib.transport"):
            stranger.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" * 10)
            assert await closed_by_peer(stranger)
        await a.send(1, header(1, 3, 0), b"abc")
        message = await b.recv(header(1, 3, 0).key)
        assert message.payload.bytes == b"abc" and a.links()["direct"] == [1]
        assert any("direct link closed" in r.message for r in caplog.records)
    finally:
        await a.close()
        await b.close()


async def test_when_a_link_breaks_zeromq_carries_the_next_messages(addresses):
    a, b = await linked_pair(addresses)
    try:
        for reader in list(b.direct.listener.readers):  # the receiving end goes away
            reader.close()
        for seq in range(50):  # the first may still be taken by the dying socket
            await a.send(1, header(seq, 1, 0), b"x")
            await asyncio.sleep(0.001)
        assert a.links()["direct"] == []
        message = await b.recv(header(49, 1, 0).key)
        assert message.payload.bytes == b"x"
    finally:
        await a.close()
        await b.close()


async def test_close_removes_the_link_socket_file(tmp_path):
    a, b = await linked_pair(local_addresses(2, "ipc", str(tmp_path)))
    assert sorted(f.name for f in tmp_path.iterdir()) == ["r0", "r0.d", "r1", "r1.d"]
    await a.close()
    await b.close()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("offer, peer, taken", [
    ("tcp://127.0.0.1:4000", "tcp://127.0.0.1:5000", True),
    ("tcp://10.0.0.9:4000", "tcp://127.0.0.1:5000", False),   # another host: refused
    ("ipc:///tmp/x/r1.d", "ipc:///tmp/x/r1", True),
    ("ipc:///tmp/elsewhere", "ipc:///tmp/x/r1", False),
    ("tcp://127.0.0.1:4000", "ipc:///tmp/x/r1", False),
    ("tcp://127.0.0.1:4000", "inproc://r1", False),
])
def test_an_offer_is_taken_only_where_the_peer_itself_listens(offer, peer, taken):
    assert direct.offered_by(offer, peer) is taken


async def test_an_offer_pointing_elsewhere_is_dropped_and_zeromq_carries(caplog):
    a, b = bound_pair(local_addresses(2, "tcp", ""))
    try:
        with caplog.at_level(logging.WARNING, logger="ringlib.transport"):
            await b.send(0, frames.control(Kind.LINK, 1), b"tcp://192.0.2.1:9")
            await b.send(0, header(1, 3, 1), b"abc")
            message = await a.recv(header(1, 3, 1).key)
        assert message.payload.bytes == b"abc" and a.links()["direct"] == []
        assert any("is not where rank 1" in r.message for r in caplog.records)
    finally:
        await a.close()
        await b.close()


def test_bytes_a_link_still_keeps_are_written_when_it_closes(rng):
    """A writer whose socket is full keeps the rest; closing writes it out, as ZeroMQ's
    linger does, so a rank that leaves right after its last collective loses nothing."""
    payload = rng.integers(0, 256, 32 << 20, dtype=np.uint8)
    with socket.create_server(("127.0.0.1", 0)) as server:
        got = bytearray()

        def drain() -> None:
            conn, _ = server.accept()
            with conn:
                time.sleep(0.3)  # let the writer fill the socket and keep the rest
                while chunk := conn.recv(1 << 20):
                    got.extend(chunk)

        reader = threading.Thread(target=drain)
        reader.start()

        handed_back: list = []

        async def write() -> None:
            writer = await ready_writer(server, lambda *frame: handed_back.append(frame))
            assert writer.send(b"h", payload)
            writer.close(linger=10)

        asyncio.run(write())
        reader.join(timeout=20)
    frame = direct.PREFIX.size + 1 + payload.nbytes
    assert len(got) == frame and bytes(got[-payload.nbytes:]) == payload.tobytes()
    assert handed_back == []


async def ready_writer(server: socket.socket, resend) -> direct.Writer:
    writer = direct.Writer(f"tcp://127.0.0.1:{server.getsockname()[1]}", resend)
    async with asyncio.timeout(5):
        while not writer.ready:
            await asyncio.sleep(0.001)
    return writer


def test_frames_a_failed_link_did_not_take_whole_go_to_resend_each_once(rng):
    """The receiver reads a little, then resets the link while the writer keeps frames
    its socket had no room for: those frames, the one cut in two included, go to resend
    whole and in order, each once, and are the last ones sent; what the receiver got
    ends in a frame cut short, which it would drop."""
    payloads = [rng.integers(0, 256, 200_000, dtype=np.uint8) for _ in range(80)]
    with socket.create_server(("127.0.0.1", 0)) as server:
        got = bytearray()

        def read_a_little_then_reset() -> None:
            conn, _ = server.accept()
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
            with conn:
                time.sleep(0.3)  # the writer fills the socket and keeps the rest
                got.extend(conn.recv(300_000, socket.MSG_WAITALL))

        reader = threading.Thread(target=read_a_little_then_reset)
        reader.start()
        handed_back: list = []

        async def write() -> None:
            writer = await ready_writer(server, lambda *frame: handed_back.append(frame))
            for i, payload in enumerate(payloads):
                assert writer.send(f"h{i:02d}".encode(), payload)
            async with asyncio.timeout(10):
                while not writer._closed:  # its next write finds the link reset
                    await asyncio.sleep(0.01)

        asyncio.run(write())
        reader.join(timeout=20)
    assert handed_back, "the writer kept nothing: make the payloads larger"
    first = 80 - len(handed_back)
    assert [h for h, _ in handed_back] == [f"h{i:02d}".encode() for i in range(first, 80)]
    assert all(p == payloads[first + i].tobytes() for i, (_, p) in enumerate(handed_back))
    frame = direct.PREFIX.size + 3 + 200_000
    assert len(got) == 300_000 and len(got) % frame != 0
