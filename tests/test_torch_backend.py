"""ringlib as a torch.distributed backend, under a real torchrun: every dist.* call on 2
and 3 ranks against a float64 reference (sync and async_op, every dtype), subgroups,
unmodified DDP in each of its modes, FSDP2, and a rank SIGKILLed mid-backward.

Each run of torchrun does many checks (starting torch in every rank costs seconds); the
tests below read what each rank recorded for theirs.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

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
@pytest.mark.parametrize("world", [2, 3])
def test_dist_call(tmp_path_factory, world, name):
    seed, results, output = recorded(tmp_path_factory, "torch_ops_peer.py", [], world)
    assert_ok(results, name, seed, output, range(world))


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("world", [2, 3])
def test_unmodified_ddp_trains_like_one_process(tmp_path_factory, world, variant):
    seed, results, output = recorded(tmp_path_factory, "torch_train_peer.py", ["ddp"], world)
    assert_ok(results, variant, seed, output, range(world))


@pytest.mark.parametrize("world", [2, 3])
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


def test_ctrl_c_while_a_group_forms_ends_the_process_at_once(tmp_path):
    """Rank 0 of 2 waits in init_process_group (60 s timeout) for a rank that never
    comes; a SIGINT ends it within seconds, not at the timeout, leaving nothing behind."""
    import signal
    import subprocess
    import sys
    import time

    from leftovers import assert_none_left, tagged_env
    from ringlib.runtime import processes

    script = ("import datetime, torch.distributed as dist, ringlib.torch\n"
              f"dist.init_process_group('ringlib', init_method='file://{tmp_path}/store', "
              "rank=0, world_size=2, timeout=datetime.timedelta(seconds=60))\n")
    tag, env = tagged_env(tmp_path / "tmp")
    proc = processes.start([sys.executable, "-c", script], env, stderr=subprocess.PIPE,
                           text=True)
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / "store").exists() and time.monotonic() < deadline:
            time.sleep(0.1)  # torch's import, then init_process_group makes the store
        time.sleep(1.5)      # and the ring's creator waits in it
        start = time.monotonic()
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
        assert time.monotonic() - start < 15, err
        assert "KeyboardInterrupt" in err, err
    finally:
        processes.stop([proc], grace=0)
    assert_none_left(tag)
