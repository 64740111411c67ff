"""The paths that run small collectives without messages: compiled over the shared arena
(collectives/compiled.py, ringlib/arena_kernels.py) and, with shared memory off as between
hosts, over the mesh (collectives/mesh_path.py). On each: mismatches, lost and stopped
peers, waits that do not burn a core, such collectives and message ones in flight
together, the blocking facade on its caller's thread, an oversubscribed host; and the
arena segment itself. The op x dtype grid on every path is test_ring_processes.py's; the
mesh's own parts are test_mesh.py's."""

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


# Each path and what its peers are told: the mesh's needs shared memory off.
PATHS = {"compiled": {}, "mesh": {"RINGLIB_SHM_BYTES": "0", "PATH_TAKEN": "mesh"}}
on_each_path = pytest.mark.parametrize("path", list(PATHS))


def run(scenario: str, world: int, seed: int, env: dict[str, str] | None = None,
        path: str = "compiled", **kwargs):
    return run_ring(scenario, world, "tcp", seed, extra_env={**PATHS[path], **(env or {})},
                    peer=PEER, **kwargs)


@pytest.mark.parametrize("world, path", [(2, "compiled"), (3, "compiled"), (3, "mesh")])
def test_ranks_that_call_different_collectives_all_raise_and_carry_on(world, path, seed):
    finished = run("mismatch", world, seed, path=path)
    assert all(f.returncode == 0 for f in finished), report(finished)
    # a broadcast takes messages where the mesh runs, and they find a wrong root later
    cases = ("shape", "op", "kind", "path", "setting") + (("root",) if path == "compiled" else ())
    for f in finished:
        for case in cases:
            assert f"mismatch {case}" in f.stdout, report(finished)
        assert "recovered" in f.stdout, report(finished)
    # ranks that both take the path see it at once, without waiting for a message's probe
    at_once = [float(t) for t in re.findall(r"mismatch (?:shape|op|kind|root) in ([\d.]+)"
                                            if path == "compiled" else
                                            r"mismatch (?:shape|op) in ([\d.]+)",
                                            finished[0].stdout)]
    assert max(at_once) < 1.0, report(finished)


@on_each_path
@pytest.mark.parametrize("how", ["kill", "stop"])
def test_a_peer_killed_or_stopped_mid_collective_is_lost_in_bounded_time(how, path, seed):
    victim = 2
    finished = run("die", 3, seed, {"DIE": how, "PEER_TIMEOUT": "2"}, path,
                   expendable=frozenset({victim}))
    assert [f.returncode for f in finished[:victim]] == [0, 0], report(finished)
    for f in finished[:victim]:
        elapsed = float(re.search(r"lost 2 after ([\d.]+) s", f.stdout).group(1))
        assert elapsed < 2 + 6, report(finished)  # peer_timeout, and room for a busy host


@on_each_path
def test_such_and_message_collectives_in_flight_at_once_never_mix(path, seed):
    finished = run("mixed", 3, seed, path=path)
    assert all(f.returncode == 0 and "mixed checked" in f.stdout for f in finished), \
        report(finished)


@on_each_path
def test_ranks_waiting_for_a_late_one_sleep_instead_of_spinning(path, seed):
    finished = run("late", 3, seed, path=path)
    assert all(f.returncode == 0 for f in finished), report(finished)
    for f in finished[1:]:
        wall, cpu = map(float, re.search(r"waited ([\d.]+) s on ([\d.]+) s", f.stdout).groups())
        assert wall > 1.5 and cpu < 0.5 * wall, report(finished)


def test_four_ranks_on_two_cores_complete_the_grid(seed):
    """More ranks than this host has cores: waits must yield, not starve the rank waited for."""
    finished = run("mixed", 4, seed, timeout=150)
    assert all(f.returncode == 0 and "mixed checked" in f.stdout for f in finished), \
        report(finished)


@pytest.mark.parametrize("path, rounds", [("compiled", 20000), ("mesh", 5000)])
def test_back_to_back_collectives_on_an_oversubscribed_host_stay_in_step(path, rounds, seed):
    """4 ranks on 2 cores are preempted anywhere, between any two loads of a peer's words
    or reads of its frames."""
    finished = run("many", 4, seed, {"ROUNDS": str(rounds)}, path, timeout=150)
    assert all(f.returncode == 0 and f"{rounds} rounds checked" in f.stdout
               for f in finished), report(finished)


@on_each_path
def test_the_blocking_facade_runs_them_on_its_callers_thread(path, seed):
    finished = run("blocking", 3, seed, path=path)
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
