"""Ranks under a real Open MPI mpirun, with mpi4py: the addresses travel through MPI
itself (runtime/mpi_book.py), so neither MASTER_ADDR nor the port derived from the job id
is needed. Skipped, saying so, where Open MPI or mpi4py is not installed (Debian:
apt-get install openmpi-bin libopenmpi-dev)."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ringlib.runtime.environment import without_placement

PEER = str(Path(__file__).parent / "mpi_peer.py")
MPIRUN = shutil.which("mpirun")
pytestmark = pytest.mark.skipif(
    MPIRUN is None or importlib.util.find_spec("mpi4py") is None,
    reason="Open MPI's mpirun or mpi4py is not installed here "
           "(apt-get install openmpi-bin libopenmpi-dev; pip install mpi4py)")


def mpirun(n: int, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([MPIRUN, "--allow-run-as-root", "--oversubscribe", "-n", str(n),
                           "--mca", "btl", "self,vader,tcp", sys.executable, *args],
                          capture_output=True, text=True, timeout=120,
                          env={**without_placement(os.environ), **(env or {})})


@pytest.mark.timeout(150)
def test_mpirun_ranks_trade_addresses_through_mpi(seed, tmp_path):
    done = mpirun(3, PEER, str(seed), str(tmp_path))
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    lines = sorted(tuple(p.read_text().split()) for p in tmp_path.iterdir())
    assert [line[:2] for line in lines] == [("0", "ok"), ("1", "ok"), ("2", "ok")], \
        f"seed {seed}: {done.stdout}"
    rank0, derived = lines[0][2], lines[0][3]
    assert {line[2] for line in lines} == {rank0}
    assert rank0 != derived, "rank 0 sat at the job id's port: the addresses did not go through MPI"
