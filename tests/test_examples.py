"""The examples, run as users run them: alone, and under `ringlib launch`."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from ringlib.transport.addresses import free_tcp_ports

pytestmark = pytest.mark.timeout(120)
DIGITS = str(Path(__file__).parents[1] / "examples" / "train_digits.py")


def last_epoch(output: str) -> tuple[float, float]:
    """(loss, test accuracy in %) printed for the last epoch."""
    line = [text for text in output.splitlines() if "epoch" in text][-1]
    match = re.search(r"loss ([\d.]+), test accuracy ([\d.]+)%", line)
    return float(match[1]), float(match[2])


def test_train_digits_on_2_peers_reaches_the_single_process_accuracy():
    alone = subprocess.run([sys.executable, DIGITS, "--epochs", "3"], capture_output=True,
                           text=True, timeout=100)
    assert alone.returncode == 0, alone.stderr
    peers = subprocess.run([sys.executable, "-m", "ringlib", "launch", "-n", "2", "--",
                            sys.executable, DIGITS, "--epochs", "3"],
                           capture_output=True, text=True, timeout=100)
    assert peers.returncode == 0, peers.stderr
    assert "(2 peers)" in peers.stdout and "(1 peer)" in alone.stdout
    (loss, accuracy), (alone_loss, alone_accuracy) = last_epoch(peers.stdout), last_epoch(alone.stdout)
    assert accuracy == alone_accuracy > 85
    assert abs(loss - alone_loss) <= 2e-4  # the same path, up to float rounding


def test_train_digits_with_ddp_under_torchrun_on_the_ringlib_backend_matches_one_process():
    alone = subprocess.run([sys.executable, DIGITS, "--epochs", "2"], capture_output=True,
                           text=True, timeout=100)
    port = free_tcp_ports(1)[0]
    ranks = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
                            "--master-addr=127.0.0.1", f"--master-port={port}", DIGITS,
                            "--epochs", "2", "--backend", "ringlib"],
                           capture_output=True, text=True, timeout=100)
    assert ranks.returncode == 0, ranks.stderr[-3000:]
    assert "(2 peers)" in ranks.stdout
    (loss, accuracy), (alone_loss, alone_accuracy) = last_epoch(ranks.stdout), last_epoch(alone.stdout)
    assert accuracy == alone_accuracy > 85
    assert abs(loss - alone_loss) <= 2e-4


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
