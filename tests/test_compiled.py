"""The compiled path over the shared arena (collectives/compiled.py, ringlib/arena_kernels.py):
mismatches, lost and stopped peers, waits that do not burn a core, compiled and message
collectives in flight together, the blocking facade on its caller's thread, an
oversubscribed host, and the arena segment itself. The op x dtype grid on both paths is
test_ring_processes.py's."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pytest

from ring_harness import run_ring
from ringlib.errors import ProtocolError
from ringlib.transport.arena import Arena
from ringlib.transport.segment_names import DIRECTORY

PEER = Path(__file__).with_name("compiled_peer.py")
pytestmark = pytest.mark.timeout(180)


def report(finished) -> str:
    return "\n".join(f"--- rank {f.rank} exit {f.returncode}\n{f.stdout}{f.stderr[-3000:]}"
                     for f in finished)


def run(scenario: str, world: int, seed: int, env: dict[str, str] | None = None, **kwargs):
    return run_ring(scenario, world, "tcp", seed, extra_env=env, peer=PEER, **kwargs)


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_that_call_different_collectives_all_raise_and_carry_on(world, seed):
    finished = run("mismatch", world, seed)
    assert all(f.returncode == 0 for f in finished), report(finished)
    for f in finished:
        for case in ("shape", "op", "kind", "root", "path", "setting"):
            assert f"mismatch {case}" in f.stdout, report(finished)
        assert "recovered" in f.stdout, report(finished)
    # ranks on the compiled path see it at once, without waiting for a message's probe
    compiled = [float(t) for t in re.findall(r"mismatch (?:shape|op|kind|root) in ([\d.]+)",
                                             finished[0].stdout)]
    assert max(compiled) < 1.0, report(finished)


@pytest.mark.parametrize("how", ["kill", "stop"])
def test_a_peer_killed_or_stopped_mid_collective_is_lost_in_bounded_time(how, seed):
    victim = 2
    finished = run("die", 3, seed, {"DIE": how, "PEER_TIMEOUT": "2"},
                   expendable=frozenset({victim}))
    assert [f.returncode for f in finished[:victim]] == [0, 0], report(finished)
    for f in finished[:victim]:
        elapsed = float(re.search(r"lost 2 after ([\d.]+) s", f.stdout).group(1))
        assert elapsed < 2 + 6, report(finished)  # peer_timeout, and room for a busy host


def test_compiled_and_message_collectives_in_flight_at_once_never_mix(seed):
    finished = run("mixed", 3, seed)
    assert all(f.returncode == 0 and "mixed checked" in f.stdout for f in finished), \
        report(finished)


def test_ranks_waiting_for_a_late_one_sleep_instead_of_spinning(seed):
    finished = run("late", 3, seed)
    assert all(f.returncode == 0 for f in finished), report(finished)
    for f in finished[1:]:
        wall, cpu = map(float, re.search(r"waited ([\d.]+) s on ([\d.]+) s", f.stdout).groups())
        assert wall > 1.5 and cpu < 0.5 * wall, report(finished)


def test_four_ranks_on_two_cores_complete_the_grid(seed):
    """More ranks than this host has cores: waits must yield, not starve the rank waited for."""
    finished = run("mixed", 4, seed, timeout=150)
    assert all(f.returncode == 0 and "mixed checked" in f.stdout for f in finished), \
        report(finished)


def test_back_to_back_collectives_on_an_oversubscribed_host_stay_in_step(seed):
    """4 ranks on 2 cores are preempted anywhere, between any two loads of a peer's words."""
    finished = run("many", 4, seed, {"ROUNDS": "20000"}, timeout=150)
    assert all(f.returncode == 0 and "20000 rounds checked" in f.stdout for f in finished), \
        report(finished)


def test_the_blocking_facade_runs_compiled_collectives(seed):
    finished = run("blocking", 3, seed)
    assert all(f.returncode == 0 and "blocking checked" in f.stdout for f in finished), \
        report(finished)


def test_an_arena_is_refused_under_another_nonce_or_shape_and_leaves_no_name():
    arena = Arena.create("rtest", 2, 128)
    try:
        with pytest.raises(ProtocolError):
            Arena.open(arena.name, arena.nonce + 1, 2, 128)
        with pytest.raises(ProtocolError):
            Arena.open(arena.name, arena.nonce, 3, 128)
        with pytest.raises(ProtocolError):
            Arena.open("../etc/passwd", arena.nonce, 2, 128)
        other = Arena.open(arena.name, arena.nonce, 2, 128)
        other.slots(np.dtype(np.float32))[1, 0, :3] = [1, 2, 3]
        assert arena.slots(np.dtype(np.float32))[1, 0, :3].tolist() == [1, 2, 3]
        other.close()
        assert os.path.exists(os.path.join(DIRECTORY, arena.name)), "a mapper unlinked it"
    finally:
        arena.close()
    assert not os.path.exists(os.path.join(DIRECTORY, arena.name))
