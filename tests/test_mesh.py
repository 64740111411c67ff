"""The mesh (transport/mesh.py, collectives/mesh_path.py): small all-reduces and barriers
of a ring without a shared arena, over a TCP connection between every two ranks, run by
the calling thread. Here shared memory is off, as between hosts. The op x dtype grid on
the mesh is test_ring_processes.py's; these are compiled_peer.py's scenarios on the mesh,
and what a mesh is made of."""

from __future__ import annotations

import re
import socket
from pathlib import Path

import pytest

from ring_harness import run_ring
from ringlib.errors import PeerLost, ProtocolError
from ringlib.transport import mesh

PEER = Path(__file__).with_name("compiled_peer.py")
MESH = {"RINGLIB_SHM_BYTES": "0", "PATH_TAKEN": "mesh"}
pytestmark = pytest.mark.timeout(180)


def report(finished) -> str:
    return "\n".join(f"--- rank {f.rank} exit {f.returncode}\n{f.stdout}{f.stderr[-3000:]}"
                     for f in finished)


def run(scenario: str, world: int, seed: int, env: dict[str, str] | None = None, **kwargs):
    return run_ring(scenario, world, "tcp", seed, extra_env={**MESH, **(env or {})}, peer=PEER,
                    **kwargs)


def test_ranks_that_call_different_collectives_all_raise_and_carry_on(seed):
    finished = run("mismatch", 3, seed)
    assert all(f.returncode == 0 for f in finished), report(finished)
    for f in finished:
        for case in ("shape", "op", "kind", "path", "setting"):
            assert f"mismatch {case}" in f.stdout, report(finished)
        assert "recovered" in f.stdout, report(finished)
    # ranks on the mesh on both sides see it in the frames, without waiting for a probe
    at_once = [float(t) for t in re.findall(r"mismatch (?:shape|op) in ([\d.]+)",
                                            finished[0].stdout)]
    assert max(at_once) < 1.0, report(finished)


@pytest.mark.parametrize("how", ["kill", "stop"])
def test_a_peer_killed_or_stopped_mid_collective_is_lost_in_bounded_time(how, seed):
    victim = 2
    finished = run("die", 3, seed, {"DIE": how, "PEER_TIMEOUT": "2"},
                   expendable=frozenset({victim}))
    assert [f.returncode for f in finished[:victim]] == [0, 0], report(finished)
    for f in finished[:victim]:
        elapsed = float(re.search(r"lost 2 after ([\d.]+) s", f.stdout).group(1))
        assert elapsed < 2 + 6, report(finished)


def test_mesh_and_message_collectives_in_flight_at_once_never_mix(seed):
    finished = run("mixed", 3, seed)
    assert all(f.returncode == 0 and "mixed checked" in f.stdout for f in finished), \
        report(finished)


def test_ranks_waiting_for_a_late_one_sleep_instead_of_spinning(seed):
    finished = run("late", 3, seed)
    assert all(f.returncode == 0 for f in finished), report(finished)
    for f in finished[1:]:
        wall, cpu = map(float, re.search(r"waited ([\d.]+) s on ([\d.]+) s", f.stdout).groups())
        assert wall > 1.5 and cpu < 0.5 * wall, report(finished)


def test_back_to_back_collectives_of_four_ranks_on_two_cores_stay_in_step(seed):
    finished = run("many", 4, seed, {"ROUNDS": "5000"}, timeout=150)
    assert all(f.returncode == 0 and "5000 rounds checked" in f.stdout for f in finished), \
        report(finished)


def test_the_blocking_facade_runs_mesh_collectives_on_its_callers_thread(seed):
    finished = run("blocking", 3, seed)
    assert all(f.returncode == 0 and "blocking checked" in f.stdout for f in finished), \
        report(finished)


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


