"""Peers that die, hang or stall, in real processes over real sockets: every survivor hears
of it within the peer timeout, and the survivors of a kill re-form a ring and train on."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from ring_harness import Finished, run_ring

pytestmark = pytest.mark.timeout(120)

FAULT_PEER = Path(__file__).with_name("fault_peer.py")
FAST = {"RINGLIB_PEER_TIMEOUT": "1.5", "RINGLIB_HEARTBEAT_S": "0.25"}


def report(finished: list[Finished]) -> str:
    return "\n".join(f"--- rank {f.rank} exit {f.returncode}\n{f.stdout}{f.stderr[-3000:]}"
                     for f in finished)


@pytest.mark.parametrize("transport, env", [("tcp", {}), ("ipc", FAST),
                                            ("tcp", {**FAST, "RINGLIB_SHM_BYTES": "0"})],
                         ids=["tcp-default-timeout", "ipc-1.5s-timeout", "mesh-1.5s-timeout"])
def test_survivors_of_a_kill_re_form_and_keep_identical_parameters(transport, env, seed):
    """4 ranks train; rank 2 is SIGKILLed at step 15 (over tcp with the default peer timeout,
    5 s); the 3 survivors raise PeerLost within 10 s, re-form, and end with equal
    parameters. Over ipc the survivors also remove the killed rank's socket files; with
    shared memory off the small collectives take the mesh, which the survivors make anew."""
    finished = run_ring("train", 4, transport, seed, extra_env=env, peer=FAULT_PEER,
                        expendable=frozenset({2}), timeout=90)
    log = report(finished)
    assert finished[2].returncode == -9, log
    killed_at = float(re.search(r"killed (\S+)", finished[2].stdout).group(1))
    survivors = [f for f in finished if f.rank != 2]
    assert all(f.returncode == 0 for f in survivors), log
    ends = [re.search(r"rank (\d) of (\d) lost_at (\S+) digest (\w+)", f.stdout).groups()
            for f in survivors]
    assert sorted(int(rank) for rank, *_ in ends) == [0, 1, 2], log
    assert {world for _, world, _, _ in ends} == {"3"}, log
    assert len({digest for *_, digest in ends}) == 1, f"parameters differ:\n{log}"
    for f in survivors:  # PeerLost names the rank and its address
        assert re.search(r"lost 2 (tcp://127\.0\.0\.1:\d+|ipc://\S+/r2) ", f.stdout), log
    delays = [float(lost_at) - killed_at for _, _, lost_at, _ in ends]
    assert all(0 < d <= 10 for d in delays), (delays, log)


def test_a_stopped_rank_is_reported_lost_by_every_other_rank_and_told_when_it_wakes(seed):
    """A rank that stops (SIGSTOP: hung, or cut off) sends no heartbeats; the others'
    pending collective raises PeerLost naming it within the timeout. Woken (SIGCONT), it
    learns that it is out of the ring, and its reform() says it cannot re-form."""
    finished = run_ring("stall", 3, "tcp", seed, extra_env=FAST, peer=FAULT_PEER, timeout=60)
    log = report(finished)
    assert all(f.returncode == 0 for f in finished), log
    for f in (finished[0], finished[2]):
        found = re.search(r"lost 1 after (\S+) s: (.*)", f.stdout)
        assert found and float(found.group(1)) <= 1.5 + 1.0, log
        assert "rank 1 (tcp://127.0.0.1:" in found.group(2) and "sent nothing" in found.group(2)
    assert re.search(r"lost 1 after \S+ s: rank 1 \(tcp://\S+\) is out of the ring: rank [02]",
                     finished[1].stdout), log
    assert "left out: rank 1 " in finished[1].stdout and "cannot re-form" in finished[1].stdout


def test_a_rank_killed_in_the_phase_between_hosts_is_lost_on_every_other(seed):
    """Two hosts of two ranks, a hierarchical all-reduce: rank 3 dies as it starts the
    ring between the hosts. Every survivor, on both hosts and whichever phase it is in,
    gets PeerLost within the peer timeout."""
    messages = {**FAST, "RINGLIB_COMPILED_BYTES": "0"}
    finished = run_ring("across", 4, "tcp", seed, extra_env=messages, peer=FAULT_PEER,
                        timeout=60, hosts=2, expendable=frozenset({3}))
    log = report(finished)
    for f in finished[:3]:
        found = re.search(r"lost (\d) after (\S+) s: (.*)", f.stdout)
        assert f.returncode == 0 and found, log
        assert float(found.group(2)) <= 1.5 + 1.0, log
    assert finished[3].returncode == -9, log


@pytest.mark.skipif(shutil.which("ss") is None, reason="needs iproute2's ss to cut links")
def test_direct_links_cut_under_traffic_fall_back_to_zeromq_and_lose_nothing(seed):
    """Every rank kills the direct links its peers opened to it, mid-run: the senders
    notice, ZeroMQ carries from then on, and every all-reduce before and after comes out
    right on every rank, with no message dropped or taken twice."""
    messages = {"RINGLIB_SHM_BYTES": "0", "RINGLIB_MESH_BYTES": "0"}
    finished = run_ring("cut", 3, "tcp", seed, extra_env=messages, peer=FAULT_PEER,
                        timeout=90)
    log = report(finished)
    assert all(f.returncode == 0 and f.stdout.endswith("done\n") for f in finished), log
    assert all(re.search(r"^cut 2$", f.stdout, re.M) for f in finished), log
    assert log.count("ZeroMQ carries") >= 3 and "duplicate" not in log, log  # a link each


@pytest.mark.skipif(shutil.which("ss") is None, reason="needs iproute2's ss to cut links")
def test_a_cut_mesh_link_is_a_lost_peer_on_every_rank(seed):
    """Small all-reduces between hosts take the mesh, which has no fallback: rank 0 kills
    its connection to rank 1, and every rank's next all-reduces raise PeerLost in bounded
    time, the mesh's and the messages' alike."""
    finished = run_ring("meshcut", 3, "tcp", seed, extra_env={**FAST, "RINGLIB_SHM_BYTES": "0"},
                        peer=FAULT_PEER, timeout=60)
    log = report(finished)
    assert all(f.returncode == 0 for f in finished), log
    for f in finished:
        found = re.search(r"lost (\d) after (\S+) s: (.*)", f.stdout)
        assert found and float(found.group(2)) < 1.5 + 1.0, log
        assert "then PeerLost on messages too" in f.stdout, log
    assert "its mesh link broke: [Errno" in finished[0].stdout, log


def test_a_rank_whose_event_loop_is_busy_is_not_taken_for_lost(seed):
    """Heartbeats come from their own thread: a loop blocked for twice the peer timeout
    delays the collectives but loses nobody."""
    finished = run_ring("busy", 3, "tcp", seed, extra_env=FAST, peer=FAULT_PEER, timeout=60)
    assert all(f.returncode == 0 and "done" in f.stdout for f in finished), report(finished)


def test_a_rank_killed_during_start_up_is_named_by_every_other_within_the_peer_timeout(seed):
    """It bound its address and died before its first word: the others' connect() raises
    PeerLost naming it (and only it) about a peer timeout later, not the connect timeout
    (60 s here) later; rank 0, not its neighbour, hears it from the neighbours."""
    finished = run_ring("startup", 4, "tcp", seed, extra_env=FAST, peer=FAULT_PEER,
                        timeout=60, expendable=frozenset({2}))
    for f in finished[:2] + finished[3:]:
        assert f.returncode == 0, report(finished)
        seconds = float(re.search(r"PeerLost after ([\d.]+) s", f.stdout).group(1))
        assert seconds < 10, report(finished)
        lost = f.stdout.split("): ", 1)[1]  # after "rank R (address)", this rank itself
        assert lost.startswith("rank 2 (") and lost.count("rank ") == 1 + ("found by" in lost), \
            report(finished)
