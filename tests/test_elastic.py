"""Rings that grow in process: newcomers join a running ring (connect(join=...), launch
--join), the members admit() them, and training goes on through a join and a loss, in
real processes over real sockets."""

from __future__ import annotations

import re
import sys
import tempfile
from pathlib import Path

import pytest

from ring_harness import Finished, ringlib_env, run_ranks
from ringlib.transport.addresses import local_addresses
from ringlib.transport.security import generate

pytestmark = pytest.mark.timeout(150)

PEER = Path(__file__).with_name("elastic_peer.py")
FAST = {"RINGLIB_PEER_TIMEOUT": "1.5", "RINGLIB_HEARTBEAT_S": "0.25"}


def report(finished: list[Finished]) -> str:
    return "\n".join(f"--- process {f.rank} exit {f.returncode}\n{f.stdout}{f.stderr[-3000:]}"
                     for f in finished)


def run(scenario: str, seed: int, members: int, newcomers: list[tuple[str, dict[str, str]]],
        names: list[str] | None = None, env: dict[str, str] | None = None,
        newcomer_args: list[str] | None = None, expendable: frozenset[int] = frozenset(),
        ) -> tuple[list[Finished], list[str]]:
    """`members` ranks of `scenario` on free ports, and one process per newcomer, each
    (name, env) with "{0}", "{1}"... in its RINGLIB_JOIN standing for member addresses;
    newcomer_args run a newcomer's command under it (`ringlib launch --join ...`)."""
    with tempfile.TemporaryDirectory(prefix="rl-") as ipc_dir:
        peers = local_addresses(members, "tcp", ipc_dir)
        names = names or [f"m{r}" for r in range(members)]
        envs = [{**ringlib_env(r, members, peers), **FAST, **(env or {})}
                for r in range(members)]
        args = [[str(PEER), scenario, str(seed), names[r]] for r in range(members)]
        for name, extra in newcomers:
            join = extra["RINGLIB_JOIN"].format(*peers)
            command = [str(PEER), scenario, str(seed), name]
            if newcomer_args is not None:
                command = [*newcomer_args, "--join", join, "--", sys.executable, *command]
                extra = {k: v for k, v in extra.items() if k != "RINGLIB_JOIN"}
            else:
                extra = {**extra, "RINGLIB_JOIN": join}
            envs.append({**FAST, **(env or {}), **extra})
            args.append(command)
        return run_ranks(args, envs, timeout=120, expendable=expendable), peers


def test_a_newcomer_joins_three_training_ranks_then_one_dies_and_all_finish_alike(seed):
    """3 ranks train; a 4th process, started by `ringlib launch --join`, is admitted after
    step 3 and takes the members' state; the 4 agree bit for bit at step 9, when one
    member SIGKILLs itself; the 3 survivors re-form and finish with identical parameters.
    Every step's averaged gradients match float64 on every rank."""
    launcher = ["-m", "ringlib", "launch", "-n", "1", "--timeout", "60"]
    finished, _ = run("train", seed, 3, [("newcomer", {"RINGLIB_JOIN": "{0}"})],
                      names=["m0", "m1", "victim"], newcomer_args=launcher,
                      expendable=frozenset({2}))
    log = report(finished)
    assert finished[2].returncode == -9, log
    survivors = [f for i, f in enumerate(finished) if i != 2]
    assert all(f.returncode == 0 for f in survivors), log
    at_kill = [re.search(r"step 9 world 4 digest (\w+)", f.stdout) for f in finished]
    assert all(at_kill), log
    assert len({m.group(1) for m in at_kill}) == 1, f"the 4 ranks differ:\n{log}"
    ends = [re.search(r"end (\S+) rank (\d) world (\d) generation (\d) digest (\w+)",
                      f.stdout).groups() for f in survivors]
    assert sorted(int(rank) for _, rank, *_ in ends) == [0, 1, 2], log
    assert {(world, generation) for _, _, world, generation, _ in ends} == {("3", "2")}, log
    assert len({d for *_, d in ends}) == 1, f"the survivors differ:\n{log}"


def test_a_newcomer_without_the_rings_key_is_refused_and_logged(seed, tmp_path):
    right, wrong = (generate(tmp_path / name)[1] for name in ("ring", "other"))
    finished, _ = run("refused", seed, 2, [("newcomer", {"RINGLIB_JOIN": "{0}",
                                                         "RINGLIB_CURVE_KEY": str(wrong)})],
                      env={"RINGLIB_CURVE_KEY": str(right)})
    log = report(finished)
    assert all(f.returncode == 0 for f in finished), log
    for member in finished[:2]:
        assert "admitted none, waiting 0 world 2" in member.stdout, log
    assert re.search(r"rank 0 \(tcp://\S+\) refused a connection whose CurveZMQ handshake "
                     r"failed \(HANDSHAKE_FAILED_\w+\)", finished[0].stderr), log
    assert re.search(r"refused: the newcomer at tcp://\S+ asked the member at tcp://\S+ to "
                     r"be admitted.*does it hold the ring's key", finished[2].stdout), log


def test_a_newcomer_killed_while_being_admitted_leaves_the_members_ring_intact(seed):
    finished, peers = run("dies", seed, 3, [("newcomer", {"RINGLIB_JOIN": "{1}"})],
                          expendable=frozenset({3}))
    log = report(finished)
    assert finished[3].returncode == -9, log
    for member in finished[:3]:
        assert member.returncode == 0, log
        assert re.search(r"admit raised RendezvousError: rank \d \(tcp://\S+\): admitting "
                         r"tcp://\S+ failed, and the ring goes on as it was", member.stdout), log
        assert "intact world 3 generation 0 waiting 0" in member.stdout, log


def test_two_newcomers_asking_different_members_take_the_same_ranks_everywhere(seed):
    finished, peers = run("two", seed, 3, [("newcomer-a", {"RINGLIB_JOIN": "{0}"}),
                                           ("newcomer-b", {"RINGLIB_JOIN": "{2}"})])
    log = report(finished)
    assert all(f.returncode == 0 for f in finished), log
    tables = [re.search(r"(\S+) rank (\d) table (\S+)", f.stdout).groups() for f in finished]
    assert len({table for *_, table in tables}) == 1, f"the ranks disagree:\n{log}"
    ranks = {name: int(rank) for name, rank, _ in tables}
    assert sorted(ranks.values()) == [0, 1, 2, 3, 4], log
    assert {ranks["newcomer-a"], ranks["newcomer-b"]} == {3, 4}, log
    assert all(ranks[f"m{r}"] == r for r in range(3)), log


def test_reform_drops_a_lost_member_and_admits_a_waiting_newcomer_in_one_call(seed):
    finished, _ = run("replace", seed, 3, [("newcomer", {"RINGLIB_JOIN": "{1}"})],
                      names=["m0", "m1", "victim"], expendable=frozenset({2}))
    log = report(finished)
    assert finished[2].returncode == -9, log
    alive = [f for i, f in enumerate(finished) if i != 2]
    assert all(f.returncode == 0 for f in alive), log
    ends = [re.search(r"(\S+) rank (\d) world (\d) generation (\d) table (\S+)", f.stdout).groups()
            for f in alive]
    assert [(name, rank) for name, rank, *_ in ends] == [("m0", "0"), ("m1", "1"),
                                                         ("newcomer", "2")], log
    assert {(world, generation) for _, _, world, generation, _ in ends} == {("3", "2")}, log
    assert len({table for *_, table in ends}) == 1, log


def test_join_refuses_a_rank_given_with_it_and_a_bad_address():
    import ringlib
    with pytest.raises(ringlib.InvalidArgument, match="give join alone"):
        ringlib.connect(rank=0, world_size=2, join="tcp://127.0.0.1:1")
    with pytest.raises(ringlib.RendezvousError, match="is not tcp://host:port"):
        ringlib.init(join="nowhere", timeout=1)
