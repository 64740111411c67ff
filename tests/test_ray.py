"""Ray Train's TorchTrainer on the "ringlib" torch.distributed backend, for real: the
example starts a local Ray instance, trains the digits classifier with DDP on 2 Ray
workers, and follows the single process's path; nothing of Ray's outlives it."""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

pytest.importorskip("ray.train.torch", reason="the ray extra (ray[train]) is not installed")

from digits_harness import assert_follows_one_process  # noqa: E402
from leftovers import assert_none_left, tagged_env  # noqa: E402

EXAMPLE = str(Path(__file__).parents[1] / "examples" / "ray_train_digits.py")


@pytest.mark.timeout(240)
def test_ray_train_with_ddp_on_the_ringlib_backend_matches_one_process(tmp_path):
    # Ray's socket paths must stay short: a temporary directory of its own under /tmp.
    with tempfile.TemporaryDirectory(prefix="ray", dir="/tmp") as ray_tmp:
        tag, env = tagged_env(tmp_path / "tmp", RAY_TMPDIR=ray_tmp)
        ray = subprocess.run([sys.executable, EXAMPLE, "--workers", "2", "--epochs", "2"],
                             capture_output=True, text=True, timeout=200, env=env)
        assert ray.returncode == 0, (ray.stdout + ray.stderr)[-4000:]
        assert_none_left(tag, within=20)
    out = ray.stdout + ray.stderr  # Ray forwards the workers' output to the driver
    assert "backend ringlib: final test accuracy" in out, out[-4000:]
    assert "(2 peers)" in out
    assert_follows_one_process(out, 2)
    assert re.search(r"RayTrainWorker pid=\d+", out)
