"""The examples, run as users run them: alone, and under `ringlib launch` or torchrun."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from digits_harness import DIGITS, assert_follows_one_process, held_above_a_free_port
from ringlib.transport.addresses import free_tcp_ports

pytestmark = pytest.mark.timeout(120)


def test_train_digits_on_2_peers_reaches_the_single_process_accuracy():
    peers = subprocess.run([sys.executable, "-m", "ringlib", "launch", "-n", "2", "--",
                            sys.executable, DIGITS, "--epochs", "3"],
                           capture_output=True, text=True, timeout=100)
    assert peers.returncode == 0, peers.stderr
    assert "(2 peers)" in peers.stdout
    assert_follows_one_process(peers.stdout, 3)


def torchrun(port: int, *flags: str) -> subprocess.CompletedProcess:
    """The digits example for 2 epochs on 2 ranks under a real torchrun."""
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
                           "--master-addr=127.0.0.1", f"--master-port={port}", DIGITS,
                           "--epochs", "2", *flags], capture_output=True, text=True, timeout=100)


def test_train_digits_with_ddp_under_torchrun_on_the_ringlib_backend_matches_one_process():
    ranks = torchrun(free_tcp_ports(1)[0], "--backend", "ringlib")
    assert ranks.returncode == 0, ranks.stderr[-3000:]
    assert "(2 peers)" in ranks.stdout
    assert_follows_one_process(ranks.stdout, 2)


def test_train_digits_under_torchrun_on_ringlib_init_meets_in_torchruns_store():
    """ringlib.init() under torchrun trades addresses through the agent's store at
    MASTER_PORT: with MASTER_PORT + 1 taken, the ranks still meet."""
    with held_above_a_free_port() as port:
        ranks = torchrun(port)
    assert ranks.returncode == 0, ranks.stderr[-3000:]
    assert "(2 peers)" in ranks.stdout
    assert_follows_one_process(ranks.stdout, 2)


def test_ringlib_init_under_torchrun_forms_again_after_a_restart():
    """The agent keeps its store across restarts: the second try's ranks must not meet
    what the killed first try left there."""
    restart = str(Path(__file__).parent / "torchrun_restart_peer.py")
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
                           "--max-restarts=1", "--master-addr=127.0.0.1",
                           f"--master-port={free_tcp_ports(1)[0]}", restart],
                          capture_output=True, text=True, timeout=100)
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(re.findall(r"^(\d) (\d) ([\d.]+)$", done.stdout, re.M)) == \
        [("0", "1", "3.0"), ("1", "1", "3.0")], done.stdout


PIPELINE = str(Path(__file__).parents[1] / "examples" / "pipeline_inference.py")


@pytest.mark.parametrize("ranks, flags", [(2, []), (3, ["--onnx"])])
def test_pipeline_inference_matches_the_whole_model(ranks, flags):
    run = subprocess.run([sys.executable, "-m", "ringlib", "launch", "-n", str(ranks), "--",
                          sys.executable, PIPELINE, "--batches", "6", *flags],
                         capture_output=True, text=True, timeout=100)
    assert run.returncode == 0, run.stderr
    kind = "ONNX" if flags else "torch"
    match = re.search(rf"\[0\] 6 batches of 32 through {ranks} {kind} stages in [\d.]+ s; "
                      r"max \|difference\| from the whole model: ([\d.e+-]+)", run.stdout)
    assert match, run.stdout
    assert float(match[1]) <= (1e-5 if flags else 1e-6)


def test_pipeline_inference_survives_losing_a_stage_under_an_elastic_launch():
    env = {**os.environ, "RINGLIB_PEER_TIMEOUT": "1.5", "RINGLIB_HEARTBEAT_S": "0.25"}
    run = subprocess.run([sys.executable, "-m", "ringlib", "launch", "-n", "3", "--elastic",
                          "--", sys.executable, PIPELINE, "--lose-rank", "2"],
                         env=env, capture_output=True, text=True, timeout=100)
    assert run.returncode == 0, run.stderr
    assert "rank 2 on localhost was killed by SIGKILL; the others go on" in run.stderr
    match = re.search(r"\[0\] 20 batches of 32 through 2 torch stages in [\d.]+ s on the "
                      r"re-formed ring \(generation 1\); max \|difference\| from the whole "
                      r"model: ([\d.e+-]+)", run.stdout)
    assert match and float(match[1]) <= 1e-6, run.stdout
