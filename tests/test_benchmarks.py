"""The benchmarks, run for real: their tables, their failures, and their clean-up.

Every run carries a unique RINGLIB_TEST_TAG in its environment, which the ranks it
spawns inherit, so /proc tells whether any of them outlived the benchmark; and a private
TMPDIR, which tells whether it removed its temporary directory.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from leftovers import assert_none_left, processes_with, tagged_env

pytestmark = pytest.mark.skipif(not Path("/proc/self/environ").exists(),
                                reason="finds leftover ranks through /proc")

BENCH = [sys.executable, "-m", "ringlib.bench.allreduce"]


@pytest.mark.timeout(60)
def test_it_prints_a_checked_row_per_size_and_leaves_no_process(tmp_path):
    tag, env = tagged_env(tmp_path / "tmp")
    run = subprocess.run([*BENCH, "--sizes", "8B,64KiB", "--iters", "5"], env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=50)
    assert run.returncode == 0, run.stderr
    rows = {m[1]: int(m[2]) for m in re.finditer(
        r"^\s*(8 B|64 KiB)\s+(\d+)\s+float32\s+5\s+[\d.]+\s+[\d.]+\s+[\d.]+\s+[\d.]+\s+\w+$",
        run.stdout, re.MULTILINE)}
    assert rows == {"8 B": 2, "64 KiB": 16384}, run.stdout
    assert "busbw = algbw * 2(n-1)/n" in run.stdout and "2 ranks on tcp" in run.stdout
    assert_none_left(tag)
    assert not list((tmp_path / "tmp").iterdir())


@pytest.mark.timeout(60)
def test_a_failing_rank_fails_the_run_with_its_stderr_and_leaves_no_process(tmp_path):
    # Every rank fails as it joins the ring.
    tag, env = tagged_env(tmp_path / "tmp", RINGLIB_SEGMENT_BYTES="lots")
    run = subprocess.run([*BENCH, "--sizes", "8B", "--iters", "5"], env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=50)
    assert run.returncode != 0
    assert "exited non-zero" in run.stderr and "'lots'" in run.stderr, run.stderr
    assert_none_left(tag)
    assert not list((tmp_path / "tmp").iterdir())


@pytest.mark.timeout(60)
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["ctrl-c", "kill-9"])
def test_stopping_the_benchmark_mid_run_stops_every_rank(tmp_path, sig):
    tag, env = tagged_env(tmp_path / "tmp")
    # A shell's background job inherits SIGINT ignored, so restore it for the benchmark.
    bench = subprocess.Popen([*BENCH, "--sizes", "16MiB", "--iters", "100000"], env=env,
                             cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, preexec_fn=lambda: signal.signal(signal.SIGINT,
                                                                         signal.SIG_DFL))
    try:
        assert "p50 us" in bench.stdout.readline()  # the ranks are connected and timing
        assert len(processes_with(tag)) == 3
        bench.send_signal(sig)
        bench.wait(timeout=20)
    finally:
        if bench.poll() is None:
            bench.kill()
        bench.communicate()
    assert bench.returncode != 0
    assert_none_left(tag)  # after kill -9 the ranks stop themselves: their stdin closed
    if sig != signal.SIGKILL:  # which leaves only the temporary directory behind
        assert not list((tmp_path / "tmp").iterdir())


@pytest.mark.timeout(120)
def test_the_trainer_benchmark_reports_the_three_step_kinds_and_the_hidden_share(tmp_path):
    tag, env = tagged_env(tmp_path / "tmp")
    run = subprocess.run([sys.executable, "-m", "ringlib", "bench", "trainer", "--steps", "3",
                          "--batch", "8"], env=env, cwd=tmp_path, capture_output=True,
                         text=True, timeout=110)
    assert run.returncode == 0, run.stderr
    for label in ("compute only", "with gradient averaging", "all-reduce of the buckets"):
        assert re.search(rf"{label} +[\d.]+ +[\d.]+$", run.stdout, re.M), run.stdout
    assert re.search(r"averaging adds -?[\d.]+ ms to a step: -?\d+% of the communication",
                     run.stdout)
    assert_none_left(tag)


@pytest.mark.timeout(120)
def test_the_pipeline_benchmark_compares_the_pipeline_with_one_process(tmp_path):
    tag, env = tagged_env(tmp_path / "tmp")
    run = subprocess.run([sys.executable, "-m", "ringlib", "bench", "pipeline", "--width", "64",
                          "--layers", "2", "--batches", "2", "--rounds", "1"], env=env,
                         cwd=tmp_path, capture_output=True, text=True, timeout=110)
    assert run.returncode == 0, run.stderr
    assert re.search(r"whole model, one process +\d+$", run.stdout, re.M), run.stdout
    assert re.search(r"2-stage pipeline, 2 peers +\d+ +[\d.]+x$", run.stdout, re.M)
    assert re.search(r"micro-batch latency through the pipeline: p50 [\d.]+ ms", run.stdout)
    assert_none_left(tag)
