"""ringlib as a torch.distributed backend, under a real torchrun: every dist.* call on 3
ranks (and 2: make test-long) against a float64 reference (sync and async_op, every
dtype), subgroups, unmodified DDP in each of its modes, FSDP2, and a rank SIGKILLed
mid-backward.

Each run of torchrun does many checks (starting torch in every rank costs seconds); the
tests below read what each rank recorded for theirs.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from torch_ops_peer import check_names
from torch_train_peer import AVERAGER, VARIANTS
from torchrun_harness import torchrun

pytestmark = pytest.mark.timeout(240)
HERE = Path(__file__).parent
_runs: dict[tuple, tuple[int, dict[int, dict]]] = {}


def _seed() -> int:
    return int(os.environ.get("RINGLIB_TEST_SEED", np.random.SeedSequence().entropy % 2**32))


def recorded(tmp_path_factory, script: str, mode: list[str], nproc: int,
             **options) -> tuple[int, dict[int, dict], str]:
    """What every rank of one torchrun of `script` recorded (run once per session)."""
    key = (script, tuple(mode), nproc)
    if key not in _runs:
        seed = _seed()
        tmp = tmp_path_factory.mktemp(f"{Path(script).stem}-{'-'.join(mode)}-{nproc}")
        run = torchrun(tmp, nproc, HERE / script, [*mode, str(seed)], **options)
        results = {rank: json.loads(path.read_text()) for rank, path in run.results.items()}
        _runs[key] = (seed, results, run.output[-4000:])
    return _runs[key]


def assert_ok(results: dict[int, dict], name: str, seed: int, output: str,
              ranks: range) -> None:
    assert set(results) >= set(ranks), f"ranks {sorted(set(ranks) - set(results))} " \
        f"recorded nothing (RINGLIB_TEST_SEED={seed}):\n{output}"
    for rank in ranks:
        assert results[rank][name] == "ok", \
            f"rank {rank}, RINGLIB_TEST_SEED={seed}:\n{results[rank][name]}"


@pytest.mark.parametrize("name", check_names())
@pytest.mark.parametrize("world", [pytest.param(2, marks=pytest.mark.long), 3])
def test_dist_call(tmp_path_factory, world, name):
    seed, results, output = recorded(tmp_path_factory, "torch_ops_peer.py", [], world)
    assert_ok(results, name, seed, output, range(world))


# DDP on 2 ranks (one torchrun for both tests): make test-long; tests/test_examples.py
# trains with DDP on 2 ranks under torchrun
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("world", [pytest.param(2, marks=pytest.mark.long), 3])
def test_unmodified_ddp_trains_like_one_process(tmp_path_factory, world, variant):
    seed, results, output = recorded(tmp_path_factory, "torch_train_peer.py", ["ddp"], world)
    assert_ok(results, variant, seed, output, range(world))


@pytest.mark.parametrize("world", [pytest.param(2, marks=pytest.mark.long), 3])
def test_gradient_averager_on_a_ringlib_group_trains_like_one_process(tmp_path_factory, world):
    seed, results, output = recorded(tmp_path_factory, "torch_train_peer.py", ["ddp"], world)
    assert_ok(results, AVERAGER, seed, output, range(world))


def test_fsdp2_trains_like_one_process(tmp_path_factory):
    seed, results, output = recorded(tmp_path_factory, "torch_train_peer.py", ["fsdp"], 2)
    assert_ok(results, "fsdp", seed, output, range(2))


def test_a_rank_killed_mid_backward_raises_peer_lost_in_every_survivor(tmp_path_factory):
    """The last of 3 ranks SIGKILLs itself inside its third backward pass: each survivor's
    backward raises PeerLost, naming that rank, within about the peer timeout (2 s)."""
    seed, results, output = recorded(
        tmp_path_factory, "torch_train_peer.py", ["kill"], 3, monitor_interval=60,
        expected=2, env={"RINGLIB_PEER_TIMEOUT": "2", "RINGLIB_HEARTBEAT_S": "0.25"})
    assert set(results) == {0, 1}, f"RINGLIB_TEST_SEED={seed}:\n{output}"
    for rank, seen in results.items():
        assert seen["raised"] == "PeerLost" and seen["step"] == 2, (rank, seen)
        assert "rank 2" in seen["message"], seen["message"]
        assert seen["seconds"] < 15, seen


def test_a_group_that_failed_to_form_forms_on_the_next_try():
    """Rank 0 of 2 tries alone and times out; then both try and meet: the one that gave
    up took its count back. A trade abandoned from another thread stops at once."""
    import concurrent.futures
    import time

    import torch.distributed as dist

    from ringlib import RendezvousError, RendezvousTimeout
    from ringlib.runtime.store_book import StoreBook

    store = dist.PrefixStore("group/", dist.HashStore())
    with pytest.raises(RendezvousTimeout, match=r"rank 0 \(tcp://a:1\) .* ranks \[1\]"):
        StoreBook(store, 0, 2).trade("tcp://a:1", 0.3)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        both = [pool.submit(StoreBook(store, r, 2).trade, f"tcp://h{r}:1", 10) for r in (0, 1)]
        assert [f.result() for f in both] == [["tcp://h0:1", "tcp://h1:1"]] * 2
        book = StoreBook(store, 0, 2)
        alone = pool.submit(book.trade, "tcp://a:1", 60)
        time.sleep(0.2)
        start = time.monotonic()
        book.abandon()
        with pytest.raises(RendezvousError, match="gave up"):
            alone.result(timeout=10)
        assert time.monotonic() - start < 5


def assert_ctrl_c_ends_it_at_once(tmp_path: Path, script: str, waiting: Callable[[], bool],
                                  settle: float = 0.0, **env: str) -> None:
    """Run `script` (python -c) until `waiting()` says it waits at start-up (and `settle`
    seconds more), then SIGINT it: it must end within seconds with KeyboardInterrupt,
    leaving nothing behind."""
    import signal
    import subprocess
    import sys
    import time

    from leftovers import assert_none_left, tagged_env
    from ringlib.runtime import processes

    tag, env = tagged_env(tmp_path / "tmp", **env)
    # as from a terminal, whatever this process inherited (a shell's background job
    # ignores SIGINT, and its children with it)
    interruptible = "import signal; signal.signal(signal.SIGINT, signal.default_int_handler)\n"
    proc = processes.start([sys.executable, "-c", interruptible + script], env,
                           stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not waiting() and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(settle)
        start = time.monotonic()
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
        assert time.monotonic() - start < 15, err
        assert "KeyboardInterrupt" in err, err
    finally:
        processes.stop([proc], grace=0)
    assert_none_left(tag)


def test_ctrl_c_while_a_group_forms_ends_the_process_at_once(tmp_path):
    """Rank 0 of 2 waits in init_process_group (60 s timeout) for a rank that never
    comes; a SIGINT ends it within seconds, not at the timeout, leaving nothing behind."""
    script = ("import datetime, torch.distributed as dist, ringlib.torch\n"
              f"dist.init_process_group('ringlib', init_method='file://{tmp_path}/store', "
              "rank=0, world_size=2, timeout=datetime.timedelta(seconds=60))\n")
    # torch's import, then init_process_group makes the store, and the ring's creator
    # waits in it
    assert_ctrl_c_ends_it_at_once(tmp_path, script, (tmp_path / "store").exists, settle=1.5)


def test_ctrl_c_while_ringlib_init_waits_in_torchruns_store_ends_the_process_at_once(tmp_path):
    """ringlib.init() as rank 0 of 2 under torchrun's variables waits in the agent's store
    (here the test's own TCPStore) for a rank that never comes; a SIGINT ends it within
    seconds, not at the 60 s start-up timeout: the wait in its thread is abandoned."""
    import datetime

    import torch.distributed as dist

    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=30))
    assert_ctrl_c_ends_it_at_once(  # waiting once its count and its address are there
        tmp_path, "import ringlib; ringlib.init(timeout=60)", lambda: store.num_keys() >= 2,
        TORCHELASTIC_USE_AGENT_STORE="True", RANK="0", WORLD_SIZE="2",
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(store.port))


def test_ringlib_init_meets_in_the_store_of_a_torch_group_already_up(seed):
    """As in Ray Train's workers: RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT are set and
    a Gloo group is up; ringlib.init() forms through that group's store, with MASTER_PORT
    + 1 held by another socket."""
    import subprocess
    import sys

    from digits_harness import held_above_a_free_port
    from ringlib.runtime.environment import without_placement

    peer = str(Path(__file__).parent / "torch_store_peer.py")
    with held_above_a_free_port() as port:
        procs = [subprocess.Popen(
            [sys.executable, peer, str(seed)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, env={**without_placement(os.environ), "RANK": str(rank),
                            "WORLD_SIZE": "3", "MASTER_ADDR": "127.0.0.1",
                            "MASTER_PORT": str(port)}) for rank in range(3)]
        try:
            outs = [p.communicate(timeout=90) for p in procs]
        finally:
            for p in procs:
                p.kill()
                p.wait()
    for rank, (p, (out, err)) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, f"rank {rank}: {err[-3000:]}"
        assert out.split() == [str(rank), "ok"], f"seed {seed}: rank {rank}: {out}"
