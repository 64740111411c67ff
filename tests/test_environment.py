"""Where a process sits in the ring, from each launcher's variables (no processes needed)."""

from __future__ import annotations

import pytest

from ringlib import RendezvousError
from ringlib.runtime.environment import (JOB_PORTS, first_host, placement, slurm_nodes,
                                         without_placement)

PEERS = "tcp://10.0.0.1:29500,tcp://10.0.0.2:29500,ipc:///tmp/x/r2"


def test_ringlib_variables_give_every_address():
    where = placement(env={"RINGLIB_RANK": "2", "RINGLIB_WORLD_SIZE": "3",
                           "RINGLIB_LOCAL_RANK": "1", "RINGLIB_PEERS": PEERS})
    assert (where.rank, where.world_size, where.local_rank) == (2, 3, 1)
    assert where.peers == PEERS.split(",") and where.seed is None


def test_arguments_win_over_the_environment():
    where = placement(1, 2, ["inproc://a", "inproc://b"],
                      env={"RINGLIB_RANK": "0", "RINGLIB_WORLD_SIZE": "3", "RINGLIB_PEERS": PEERS})
    assert (where.rank, where.world_size, where.peers) == (1, 2, ["inproc://a", "inproc://b"])


def test_torchrun_meets_one_port_above_master_port():
    where = placement(env={"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1",
                           "MASTER_ADDR": "node7", "MASTER_PORT": "29500"})
    assert (where.rank, where.world_size, where.local_rank, where.source) == (3, 4, 1, "torchrun")
    assert where.seed == "tcp://node7:29501" and where.peers is None


def test_mpirun_on_one_host_meets_on_loopback_at_a_port_from_the_job_id():
    env = {"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2",
           "OMPI_COMM_WORLD_LOCAL_RANK": "1", "OMPI_COMM_WORLD_LOCAL_SIZE": "2",
           "OMPI_MCA_ess_base_jobid": "31337"}
    where = placement(env=env)
    assert (where.rank, where.world_size, where.local_rank, where.source) == (1, 2, 1, "mpirun")
    host, port = where.seed.removeprefix("tcp://").split(":")
    assert host == "127.0.0.1" and JOB_PORTS[0] <= int(port) < JOB_PORTS[1]
    assert placement(env=env).seed == where.seed, "every rank must derive the same port"


def test_mpirun_across_hosts_needs_master_addr():
    env = {"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "4",
           "OMPI_COMM_WORLD_LOCAL_SIZE": "2", "OMPI_MCA_ess_base_jobid": "1"}
    with pytest.raises(RendezvousError, match="MASTER_ADDR"):
        placement(env=env)
    assert placement(env={**env, "MASTER_ADDR": "10.1.1.1"}).seed.startswith("tcp://10.1.1.1:")


def test_srun_meets_on_the_first_node_of_the_step():
    where = placement(env={"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1",
                           "SLURM_STEP_NODELIST": "gpu[07-09,12],cpu1", "SLURM_JOB_ID": "4242"})
    assert (where.rank, where.world_size, where.local_rank, where.source) == (5, 8, 1, "srun")
    assert where.seed.startswith("tcp://gpu07:")


@pytest.mark.parametrize("nodes, first", [("node1", "node1"), ("a[3-5]", "a3"),
                                          ("gpu[07,09],x", "gpu07"), ("x,y[1-2]", "x")])
def test_first_host_of_a_slurm_node_list(nodes, first):
    assert first_host(nodes) == first


def test_slurm_node_lists_expand_in_full():
    assert slurm_nodes("node[01-04,07]") == ["node01", "node02", "node03", "node04", "node07"]
    assert slurm_nodes("gpu[07-09,12],cpu1,rack[1-2]-n[1-2]") == [
        "gpu07", "gpu08", "gpu09", "gpu12", "cpu1", "rack1-n1", "rack1-n2", "rack2-n1",
        "rack2-n2"]
    with pytest.raises(RendezvousError, match="cannot read the Slurm node list 'gpu\\[07-'"):
        slurm_nodes("gpu[07-")


def test_two_job_steps_of_one_allocation_meet_at_different_ports():
    step = {"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_ID": "4242",
            "SLURM_JOB_NODELIST": "node[01-02]"}
    seeds = {placement(env={**step, "SLURM_STEP_ID": str(i)}).seed for i in range(8)}
    assert len(seeds) == 8, seeds
    assert all(s.startswith("tcp://node01:") for s in seeds)
    again = {placement(env={**step, "SLURM_STEP_ID": str(i), "SLURM_PROCID": "1"}).seed
             for i in range(8)}
    assert again == seeds, "the ranks of one step must derive the same port"


def test_no_launcher_is_a_ring_of_one():
    where = placement(env={})
    assert (where.rank, where.world_size, where.peers, where.seed) == (0, 1, None, None)


@pytest.mark.parametrize("env, message", [
    ({"RINGLIB_RANK": "3", "RINGLIB_WORLD_SIZE": "3", "RINGLIB_PEERS": PEERS}, "rank 3 does not fit"),
    ({"RINGLIB_RANK": "x", "RINGLIB_WORLD_SIZE": "3"}, "RINGLIB_RANK='x' is not an integer"),
    ({"RINGLIB_RANK": "0", "RINGLIB_WORLD_SIZE": "2", "RINGLIB_PEERS": PEERS}, "3 peer addresses"),
    ({"RINGLIB_RANK": "0", "RINGLIB_WORLD_SIZE": "2", "RINGLIB_PEERS": "tcp://a:1,udp://b:2"},
     "udp://b:2"),
    ({"RINGLIB_RANK": "0", "RINGLIB_WORLD_SIZE": "2", "RINGLIB_PEERS": "tcp://a:1,tcp://b"},
     "port"),
    ({"RINGLIB_RANK": "0", "RINGLIB_WORLD_SIZE": "2"}, "RINGLIB_SEED"),
])
def test_bad_placements_say_what_is_wrong(env, message):
    with pytest.raises(RendezvousError, match=message):
        placement(env=env)


def test_a_parent_can_drop_every_placement_it_inherited():
    inherited = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "h",
                 "MASTER_PORT": "1", "OMPI_COMM_WORLD_RANK": "1", "SLURM_PROCID": "3",
                 "PMIX_NAMESPACE": "x", "RINGLIB_RANK": "0", "RINGLIB_PEERS": PEERS,
                 "RINGLIB_SEED": "tcp://h:1", "RINGLIB_HOST": "h", "RINGLIB_PORT": "2",
                 "RINGLIB_SEGMENT_BYTES": "8192", "PATH": "/bin"}
    assert without_placement(inherited) == {"RINGLIB_SEGMENT_BYTES": "8192", "PATH": "/bin"}
    assert placement(env=without_placement(inherited)).world_size == 1
