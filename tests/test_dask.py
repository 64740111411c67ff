"""ringlib.dask on a real dask.distributed LocalCluster of worker processes (not threads):
rings across the workers, a failing rank, a worker killed mid-run, pipeline inference
over a Dask array, and nothing left behind in the scheduler or /dev/shm."""

from __future__ import annotations

import os
import re
import signal
import threading
import time
import uuid

import numpy as np
import pytest

distributed = pytest.importorskip("distributed", reason="the dask extra is not installed")
da = pytest.importorskip("dask.array", reason="the dask extra is not installed")
torch = pytest.importorskip("torch", reason="the torch extra is not installed")

import ringlib  # noqa: E402
import ringlib.dask  # noqa: E402

PEER_TIMEOUT = 3  # s: how soon the ranks notice a killed worker


@pytest.fixture(scope="module")
def job() -> str:
    return f"dasktest{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def client(job, tmp_path_factory):
    env = {"RINGLIB_JOB": job, "RINGLIB_PEER_TIMEOUT": str(PEER_TIMEOUT)}
    with distributed.LocalCluster(n_workers=3, threads_per_worker=1, processes=True,
                                  dashboard_address=None, env=env,
                                  local_directory=str(tmp_path_factory.mktemp("dask"))) as cluster:
        with distributed.Client(cluster) as client:
            yield client
    assert not [n for n in os.listdir("/dev/shm") if job in n], "shared memory left behind"


@pytest.fixture(autouse=True)
def nothing_left_in_the_scheduler(client):
    yield
    deadline = time.monotonic() + 5  # a Variable's delete() reaches the scheduler later
    while (left := client.run_on_scheduler(_ringlib_state)) != ([], []) and \
            time.monotonic() < deadline:
        time.sleep(0.1)
    assert left == ([], []), f"a run left state behind in the scheduler: {left}"


def _ringlib_state(dask_scheduler) -> tuple[list[str], list[str]]:
    variables = dask_scheduler.extensions["variables"].variables
    return ([n for n in variables if n.startswith("ringlib/")],
            [n for n in dask_scheduler.extensions["publish"].datasets if n.startswith("ringlib")])


def reduce_and_report(ring, data: np.ndarray, scale: float, *, offset: float = 0.0):
    """Sum this rank's row of `data`, scaled and offset, over the ring."""
    mine = (data[ring.rank] * scale + offset).astype(np.float32)
    total = ring.all_reduce(mine.copy(), op="sum")
    return ring.rank, ring.world_size, os.getpid(), total


def test_run_gives_every_worker_a_rank_in_address_order(client, rng, seed):
    data = rng.standard_normal((3, 1000))
    results = ringlib.dask.run(client, reduce_and_report, data, 2.0, offset=0.5)
    reference = (data * 2.0 + 0.5).astype(np.float32).astype(np.float64).sum(axis=0)
    assert [r[:2] for r in results] == [(0, 3), (1, 3), (2, 3)]
    pids = client.run(os.getpid)
    seats = ringlib.dask.worker_seats(client)
    assert [r[2] for r in results] == [pids[w] for w in seats], "ranks not in address order"
    for _, _, _, total in results:
        np.testing.assert_allclose(total, reference, rtol=1e-5, atol=1e-5,
                                   err_msg=f"seed {seed}")


def test_run_on_chosen_workers_by_name(client, rng):
    names = {w: info["name"] for w, info in client.scheduler_info(n_workers=-1)["workers"].items()}
    chosen = sorted(names)[1:]
    results = ringlib.dask.run(client, reduce_and_report, rng.standard_normal((2, 8)), 1.0,
                               workers=[names[w] for w in chosen])
    assert [r[1] for r in results] == [2, 2]
    with pytest.raises(ringlib.InvalidArgument, match="no worker 'nobody'.*tcp://"):
        ringlib.dask.run(client, reduce_and_report, None, 1.0, workers=["nobody"])


def fail_on_rank_one(ring):
    if ring.rank == 1:
        raise ValueError("rank one's shard is corrupt")
    ring.all_reduce(np.ones(4, np.float32))  # waits for rank 1, which closed its ring
    return "unreachable"


def test_a_failing_rank_raises_on_the_client_and_releases_the_others(client):
    with pytest.raises(ValueError, match="shard is corrupt") as raised:
        ringlib.dask.run(client, fail_on_rank_one)
    notes = " ".join(raised.value.__notes__)
    assert "rank 1 of 3 (Dask worker tcp://" in notes, notes
    for other in (0, 2):  # released by the closed ring, not by the peer timeout
        assert re.search(f"rank {other}: PeerLost: [^;]*rank 1 [^;]* closed its ring",
                         notes), notes
    assert any("fail_on_rank_one" in line.name for line in _frames(raised.value))
    assert len(ringlib.dask.run(client, reduce_and_report, np.ones((3, 4)), 1.0)) == 3


def _frames(error: BaseException) -> list:
    import traceback
    return traceback.extract_tb(error.__traceback__)


def kill_rank_one_midway(ring):
    buf = np.ones(4, np.float32)
    ring.all_reduce(buf)
    if ring.rank == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    for _ in range(200):
        ring.all_reduce(buf)
        time.sleep(0.05)
    return "unreachable"


def test_a_worker_killed_mid_run_is_named_and_the_cluster_carries_on(client):
    seats = ringlib.dask.worker_seats(client)
    start = time.monotonic()
    with pytest.raises(ringlib.WorkerLost) as raised:
        ringlib.dask.run(client, kill_rank_one_midway)
    took = time.monotonic() - start
    assert raised.value.rank == 1 and raised.value.address == seats[1]
    assert f"rank 1's Dask worker {seats[1]} died" in str(raised.value)
    assert re.search("rank 0: PeerLost: .*; rank 2: PeerLost: ", raised.value.__notes__[0])
    assert took < 4 * PEER_TIMEOUT, f"{took:.1f} s to report the lost worker"
    client.wait_for_workers(3, timeout=30)  # the nanny restarts it
    assert len(ringlib.dask.run(client, reduce_and_report, np.ones((3, 4)), 1.0)) == 3


def test_a_worker_that_dies_before_its_rank_starts_releases_the_others_at_once(client):
    """Rank 2's task waits behind another task on its one thread; its worker is killed
    there. The ranks already waiting for its address stop at once, not at the start-up
    timeout."""
    seats = ringlib.dask.worker_seats(client)
    blocker = client.submit(time.sleep, 60, workers=[seats[2]], pure=False)
    pid = client.run(os.getpid, workers=[seats[2]])[seats[2]]
    killer = threading.Timer(2.0, os.kill, (pid, signal.SIGKILL))
    killer.start()
    start = time.monotonic()
    try:
        with pytest.raises(ringlib.WorkerLost, match=f"rank 2's Dask worker {seats[2]} died") \
                as raised:
            ringlib.dask.run(client, reduce_and_report, np.ones((3, 4)), 1.0, timeout=60)
    finally:
        killer.cancel()
        client.cancel([blocker])
    assert time.monotonic() - start < 15, "the others waited for the dead rank's address"
    assert re.search("rank 0: RendezvousError: .*died before it joined; rank 1: Rendezvous",
                     raised.value.__notes__[0]), raised.value.__notes__
    client.wait_for_workers(3, timeout=30)


def mlp() -> torch.nn.Sequential:
    torch.manual_seed(7)
    return torch.nn.Sequential(torch.nn.Linear(12, 32), torch.nn.GELU(), torch.nn.Linear(32, 32),
                               torch.nn.GELU(), torch.nn.Linear(32, 5))


def stage_of(rank: int, world_size: int) -> torch.nn.Module:
    from ringlib.pipeline import split_sequential
    return split_sequential(mlp(), world_size)[rank]


def test_pipeline_runs_the_blocks_of_a_dask_array_in_block_order(client, rng, seed):
    data = rng.standard_normal((203, 12)).astype(np.float32)
    array = da.from_array(data, chunks=(17, 6))  # also cut along the second axis
    out = ringlib.dask.pipeline(client, stage_of, array, micro_batch=5, max_in_flight=3)
    with torch.inference_mode():
        reference = mlp().double()(torch.as_tensor(data, dtype=torch.float64)).numpy()
    assert out.shape == (203, 5) and out.dtype == np.float32
    np.testing.assert_allclose(out, reference, rtol=1e-4, atol=1e-5, err_msg=f"seed {seed}")


def test_dask_book_times_out_naming_the_missing_rank(client):
    def lonely(run_id: str) -> str:
        from distributed import get_client
        from ringlib.runtime.dask_book import DaskBook
        book = DaskBook(get_client(), run_id, 0, 2, "127.0.0.1")
        try:
            book.trade("tcp://127.0.0.1:1", timeout=0.5)
        except ringlib.RendezvousTimeout as error:
            return str(error)
        finally:
            from distributed import Variable
            Variable(f"ringlib/{run_id}/0", client=get_client()).delete()
        return "no timeout"

    message = client.submit(lonely, uuid.uuid4().hex, pure=False).result()
    assert "waited 0.5 s in the Dask scheduler for rank 1's address" in message
