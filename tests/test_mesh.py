"""What the mesh (transport/mesh.py) is made of: its greeting, its frames and its streamed
payloads, over real sockets. The mesh's
collectives across processes are test_compiled.py's (every scenario on both paths) and
test_ring_processes.py's (the op x dtype grid); a cut mesh link is test_faults.py's."""

from __future__ import annotations

import socket

import pytest

from ringlib.errors import PeerLost, ProtocolError
from ringlib.transport import mesh


def test_a_mesh_greeting_without_the_ranks_token_is_refused():
    tokens = {1: "a1b2c3d4e5f60718"}
    assert mesh.greeted_by(mesh.hello(1, tokens[1]), tokens) == 1
    for forged in (mesh.hello(1, "0" * 16), mesh.hello(2, tokens[1]), mesh.hello(99, ""),
                   b"GET / HTTP/1.1\r\n".ljust(mesh.HELLO.size, b" ")):
        with pytest.raises(ProtocolError):
            mesh.greeted_by(forged, tokens)


def test_frames_of_earlier_collectives_are_skipped_and_later_ones_kept():
    """A collective that failed here leaves its peers' frames behind; one that runs ahead
    on a peer sends its frame early."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        a = socket.create_connection(server.getsockname())
        b, _ = server.accept()
    link = mesh.Link(a, 1, "tcp://127.0.0.1:1")
    try:
        for seq in (3, 5, 6):
            b.sendall(mesh.FRAME.pack(seq, 70 + seq, 2) + bytes([seq, seq]))
        assert link.take(5) == (75, bytes([5, 5]))  # 3 is skipped
        assert link.take(6) == (76, bytes([6, 6]))
        assert link.take(7) is None
        b.close()
        with pytest.raises(PeerLost, match="rank 1 .*: its mesh link broke"):
            link.take(7)
    finally:
        link.close()




def linked() -> tuple[mesh.Link, mesh.Link]:
    """Two ends of one real TCP connection, as two ranks' links to each other."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        a = socket.create_connection(server.getsockname())
        b, _ = server.accept()
    return mesh.Link(a, 1, "tcp://127.0.0.1:1"), mesh.Link(b, 0, "tcp://127.0.0.1:2")


def test_a_streamed_payload_is_read_in_place_after_skipping_and_keeping_other_frames():
    """A streamed frame among whole ones: an earlier collective's frame is skipped, the
    stream's payload comes by read_into (the part read with the header first), and a
    later frame that came behind it is kept."""
    sender, receiver = linked()
    try:
        sender.send(2, 72, memoryview(b"old"))
        payload = bytes(range(256)) * 4096  # 1 MiB: more than the sockets hold
        sender.send_header(3, 73, len(payload))
        into, sent, got, heard = bytearray(len(payload)), 0, 0, None
        while got < len(payload):
            sent += sender.write(memoryview(payload)[sent:])
            if sent == len(payload):
                sender.send(4, 74, memoryview(b"next"))
                sent += 1
            heard = heard or receiver.header(3)
            if heard:
                got += receiver.read_into(memoryview(into)[got:])
        assert heard == (73, len(payload)) and bytes(into) == payload
        assert receiver.read_into(memoryview(bytearray(8))) == 0  # the payload is over
        while (frame := receiver.take(4)) is None:
            sender.flush()
        assert frame == (74, b"next")
    finally:
        sender.close()
        receiver.close()


def test_a_stream_given_up_midway_leaves_the_link_in_step_for_the_next_frame():
    """The sender pads what it will not write, the receiver skips what it will not read."""
    sender, receiver = linked()
    try:
        sender.send_header(5, 75, 300_000)
        assert sender.write(memoryview(b"x" * 1000)) == 1000
        while receiver.header(5) is None:
            pass
        into = bytearray(10)
        while receiver.read_into(memoryview(into)) == 0:
            pass
        receiver.abandon()
        sender.pad(299_000)
        sender.send(6, 76, memoryview(b"after"))
        while (frame := receiver.take(6)) is None:
            sender.flush()
        assert frame == (76, b"after")
    finally:
        sender.close()
        receiver.close()
