"""What the mesh (transport/mesh.py) is made of: its greeting and its frames. The mesh's
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


