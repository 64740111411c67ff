"""Rings of real processes over real sockets: every op and dtype against a float64
reference, world sizes 1 to 3 (to 5: make test-long), tcp and ipc, numpy and torch, the blocking facade, and
the environment conventions of torchrun, mpirun and srun."""

from __future__ import annotations

import re
import socket
import zlib

import pytest

from ring_harness import PEER, assert_all_agree, run_ranks, run_ring
from ringlib.transport.addresses import free_tcp_ports
from ringlib.runtime.environment import JOB_PORTS

pytestmark = pytest.mark.timeout(300)
LONG = pytest.mark.long

# Pieces of 8 KiB and the small-message algorithms only up to 256 B, so that the ipc runs
# take the pipelined multi-piece ring path even on the grid's small sizes; and no polling
# for messages there, while the tcp runs poll (spin_us) for every small collective.
SHRUNK = {"RINGLIB_SEGMENT_BYTES": "8192", "RINGLIB_SMALL_BYTES": "256", "RINGLIB_SPIN_US": "0"}


# Messages only: the compiled path off (it would take every size up to 4 MiB).
MESSAGES = {**SHRUNK, "RINGLIB_COMPILED_BYTES": "0"}


# World sizes 2 and 3 on every path (4 and 5 too: make test-long; the hierarchical grid
# below runs 4): compiled over the shared arena (tcp), with messages (ipc, whose small
# pieces take the pipelined ring), and over the mesh where shared memory is off (the small
# sizes all to all, the rest streamed round the ring); 1 has no sockets at all.
@pytest.mark.parametrize("transport, world", [
    ("tcp", 1), ("tcp", 2), ("tcp", 3), *(pytest.param("tcp", n, marks=LONG) for n in (4, 5)),
    ("ipc", 2), ("ipc", 3), *(pytest.param("ipc", n, marks=LONG) for n in (4, 5)),
    ("mesh", 2), ("mesh", 3)])
def test_every_op_and_dtype_matches_a_float64_reference(world, transport, seed):
    extra = {"ipc": MESSAGES, "mesh": {"RINGLIB_SHM_BYTES": "0"}}.get(transport, {})
    finished = run_ring("all", world, "tcp" if transport == "mesh" else transport, seed,
                        extra_env=extra, timeout=240)
    assert_all_agree(finished)
    if transport == "mesh" and world > 1:
        assert all("1 MiB: mesh-ring, 8 B: mesh" in f.stdout for f in finished), \
            [f.stdout for f in finished]


@pytest.mark.parametrize("world, hosts, scenario", [(4, 2, "grid"),
                                                    pytest.param(6, 3, "quick", marks=LONG)])
def test_several_hosts_of_several_ranks_take_the_hierarchical_all_reduce(world, hosts,
                                                                        scenario, seed):
    """Ranks whose table puts them on `hosts` hosts, as many on each, reduce within each
    host, across the hosts, then gather within: bit-identical results on every rank, and
    a float64 reference's; on 2 hosts of 2 the whole grid (both sides of every threshold,
    many pieces), on 3 hosts of 2 one mean (the suite's time)."""
    finished = run_ring(scenario, world, "tcp", seed, extra_env=MESSAGES, timeout=240,
                        hosts=hosts)
    assert_all_agree(finished)
    assert all("all_reduce 1 MiB: hierarchical" in f.stdout for f in finished), \
        [f.stdout for f in finished]


def test_ranks_that_disagree_on_the_hierarchy_all_raise_and_carry_on(seed):
    finished = run_ring("disagree", 4, "tcp", seed, extra_env=MESSAGES, timeout=120, hosts=2)
    assert_all_agree(finished)
    # the flat all-reduce streams round the mesh
    flat = r"'all_reduce float32\[65536\] sum mesh-ring'"
    assert all(re.search(rf"mismatch: .*called {flat} .*'all_reduce float32\[65536\] sum "
                         rf"hierarchical'|mismatch: .*sum hierarchical' where .*called {flat}",
                         f.stdout) for f in finished), [f.stdout for f in finished]


def test_the_blocking_facade(seed):
    assert_all_agree(run_ring("blocking", 3, "tcp", seed))


def port_for_job(prefix: str) -> tuple[str, int]:
    """A job id whose derived seed port is free right now."""
    for i in range(1000):
        job = f"{prefix}{i}"
        port = JOB_PORTS[0] + zlib.crc32(job.encode()) % (JOB_PORTS[1] - JOB_PORTS[0])
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
        return job, port
    raise AssertionError("no free port derived from 1000 job ids")


def launcher_envs(launcher: str, world: int) -> list[dict[str, str]]:
    if launcher == "torchrun":
        master_port = free_tcp_ports(1)[0] - 1
        return [{"RANK": str(r), "WORLD_SIZE": str(world), "LOCAL_RANK": str(r),
                 "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(master_port)}
                for r in range(world)]
    if launcher == "mpirun":
        job, _ = port_for_job("ompi-")
        return [{"OMPI_COMM_WORLD_RANK": str(r), "OMPI_COMM_WORLD_SIZE": str(world),
                 "OMPI_COMM_WORLD_LOCAL_RANK": str(r), "OMPI_COMM_WORLD_LOCAL_SIZE": str(world),
                 "OMPI_MCA_ess_base_jobid": job} for r in range(world)]
    job, _ = port_for_job("")
    return [{"SLURM_PROCID": str(r), "SLURM_NTASKS": str(world), "SLURM_LOCALID": str(r),
             "SLURM_STEP_NODELIST": "localhost", "SLURM_JOB_ID": job} for r in range(world)]


@pytest.mark.parametrize("launcher", ["torchrun", "mpirun", "srun"])
def test_peers_meet_through_rank_0_under_other_launchers(launcher, seed):
    world = 3
    finished = run_ranks([str(PEER), "quick", str(seed)], launcher_envs(launcher, world),
                         timeout=120)
    assert_all_agree(finished)
    assert sorted(f.stdout.split()[1] for f in finished) == ["0", "1", "2"]
