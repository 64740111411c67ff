"""The benchmarks, run for real: their tables, their failures, and their clean-up.

Every run carries a unique RINGLIB_TEST_TAG in its environment, which the ranks it
spawns inherit, so /proc tells whether any of them outlived the benchmark; and a private
TMPDIR, which tells whether it removed its temporary directory.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from leftovers import assert_none_left, processes_with, tagged_env

pytestmark = pytest.mark.skipif(not Path("/proc/self/environ").exists(),
                                reason="finds leftover ranks through /proc")

BENCH = [sys.executable, "-m", "ringlib", "bench", "allreduce"]
HAVE_MPI = shutil.which("mpirun") is not None and importlib.util.find_spec("mpi4py") is not None
NUMBER = r"[\d.]+"
needs_hosts = pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("unshare") or not shutil.which("ip"),
    reason="two hosts are network and mount namespaces: needs root, iproute2 and unshare")


def row(size: str, count: int, iters: int, algo: str, compared: int = 0) -> str:
    """A table row: nccl-tests' columns, +mem, algo, then a time and a ratio per system."""
    cells = [size, str(count), "float32", str(iters), *[NUMBER] * 4, rf"(?:{NUMBER}|-)", algo,
             *[NUMBER] * 2 * compared]
    return r"^\s*" + r"\s+".join(cells) + "$"


def bench(tmp_path: Path, *args: str, timeout: float = 100,
          env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run `ringlib bench ARGS` as a user would (with `env` added to its environment);
    check it exits 0 and leaves nothing behind."""
    tag, env = tagged_env(tmp_path / "tmp", **(env or {}))
    run = subprocess.run([sys.executable, "-m", "ringlib", "bench", *args], env=env,
                         cwd=tmp_path, capture_output=True, text=True, timeout=timeout)
    assert run.returncode == 0, run.stderr
    assert_none_left(tag)
    # torch keeps its compile cache there (torchinductor_USER); anything else is ringlib's
    assert not [p for p in (tmp_path / "tmp").iterdir()
                if not p.name.startswith("torchinductor_")]
    return run


@pytest.mark.timeout(60)
def test_it_prints_a_checked_row_per_size_and_leaves_no_process(tmp_path):
    """With the blocking facade and the cost of CurveZMQ beside it: second and third rings,
    whose keys and addresses leave no file behind."""
    run = bench(tmp_path, "allreduce", "--sizes", "8B,64KiB", "--iters", "5", "--compare", "curve")
    assert re.search(row("8 B", 2, 5, "compiled", 2), run.stdout, re.M), run.stdout
    assert re.search(row("64 KiB", 16384, 5, "compiled", 2), run.stdout, re.M), run.stdout
    assert "busbw = algbw * 1.00" in run.stdout and "2 ranks on tcp" in run.stdout
    assert "ringlib/blocking" in run.stdout and "slower of ringlib and blocking / curve" \
        in run.stdout
    assert "ringlib/curve" in run.stdout and "with CurveZMQ" in run.stdout
    assert "command: ringlib bench allreduce --sizes 8B,64KiB --iters 5 --compare curve" \
        in run.stdout


@pytest.mark.timeout(120)
def test_gloo_and_mpi_are_timed_in_the_same_run_with_json_and_plot(tmp_path):
    run = bench(tmp_path, "allreduce", "--sizes", "8B,1MiB", "--iters", "3", "--compare",
                "gloo,mpi", "--json", "out.json", "--plot", "out.png")
    compared = 3 if HAVE_MPI else 2  # the blocking facade, gloo, mpi
    assert re.search(row("8 B", 2, 3, "compiled", compared), run.stdout, re.M), run.stdout
    assert re.search(row("1 MiB", 262144, 3, "compiled-split", compared), run.stdout, re.M), \
        run.stdout
    assert "ringlib/gloo" in run.stdout and "slower of ringlib and blocking / gloo" in run.stdout
    if HAVE_MPI:
        assert "ringlib/mpi" in run.stdout and "compared with gloo: torch" in run.stdout
    else:
        assert "skipped mpi: " in run.stdout
    doc = json.loads((tmp_path / "out.json").read_text())
    systems = ["ringlib", "blocking", "gloo", "mpi"][:1 + compared]
    assert [[x["system"] for x in r["results"]] for r in doc["rows"]] == [systems, systems]
    assert [r["bytes"] for r in doc["rows"]] == [8, 1 << 20]
    assert all(x["p50_us"] > 0 and x["busbw_gbs"] > 0 for r in doc["rows"] for x in r["results"])
    assert doc["machine"]["cores"] >= 1 and doc["machine"]["packages"]["pyzmq"]
    assert (tmp_path / "out.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.timeout(150)
@pytest.mark.parametrize("collective, algo", [("reduce_scatter", "compiled"),
                                              ("all_gather", "compiled"),
                                              ("broadcast", "compiled"), ("latency", "p2p")])
def test_every_collective_is_checked_and_timed_beside_gloo(tmp_path, collective, algo):
    run = bench(tmp_path, collective, "--sizes", "64B,192KiB", "--iters", "2", "--warmup", "0",
                "--compare", "gloo", "--no-memory")
    assert re.search(row("64 B", 16, 2, algo, 2), run.stdout, re.M), run.stdout
    assert re.search(row("192 KiB", 49152, 2, algo, 2), run.stdout, re.M), run.stdout


@pytest.mark.timeout(100)
def test_with_the_compiled_path_and_the_mesh_off_the_message_algorithms_run_on_one_api(tmp_path):
    run = bench(tmp_path, "allreduce", "--sizes", "8B,1MiB", "--iters", "2", "--api", "async",
                "--no-memory", env={"RINGLIB_COMPILED_BYTES": "0", "RINGLIB_MESH_BYTES": "0"})
    assert re.search(row("8 B", 2, 2, "doubling"), run.stdout, re.M), run.stdout
    # Two ranks of one host that may read each other's memory take the pairwise all-reduce
    # (transport/single_copy.py), others the ring.
    assert re.search(row("1 MiB", 262144, 2, "(?:pairwise|ring)"), run.stdout, re.M), run.stdout
    assert "blocking" not in run.stdout


@pytest.mark.parametrize("args, message", [
    (["reduce_scatter", "--sizes", "12B"], "not whole multiples of 8 bytes (float32 x 2 ranks)"),
    (["latency", "-n", "3"], "latency is a ping-pong between two ranks: -n 2"),
    (["allreduce", "--compare", "nccl"], "unknown system nccl"),
    (["allreduce", "--crossover", "--spin", "0,100"], "compare one setting at a time"),
    (["broadcast", "--segment", "1MiB"], "--crossover and --segment compare all-reduce"),
])
def test_bad_arguments_are_refused_before_any_rank_starts(tmp_path, args, message):
    run = subprocess.run([*BENCH[:-1], *args], capture_output=True, text=True, timeout=30,
                         cwd=tmp_path)
    assert run.returncode == 2 and message in run.stderr, run.stderr


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
    run = bench(tmp_path, "trainer", "--steps", "3", "--batch", "8", timeout=110)
    for label in ("compute only", "with gradient averaging", "all-reduce of the buckets"):
        assert re.search(rf"{label} +[\d.]+ +[\d.]+$", run.stdout, re.M), run.stdout
    assert re.search(r"averaging adds -?[\d.]+ ms to a step: -?\d+% of the communication",
                     run.stdout)


@pytest.mark.timeout(120)
def test_the_ddp_benchmark_compares_ddp_on_ringlib_with_gloo_and_compute_on_both_paths(tmp_path):
    run = bench(tmp_path, "ddp", "--steps", "3", "--batch", "8", timeout=110)
    times, ratios, cpu = r"(?:[\d.]+ +){3}", r"[\d.]+x +[\d.]+x +", r"[\d.]+ / [\d.]+ / [\d.]+ "
    for path in ("one host (shm)", "tcp only (shm off)"):
        assert re.search(rf"^  {re.escape(path)} +{times}{ratios}{cpu}", run.stdout, re.M), \
            run.stdout
    assert "command: ringlib bench ddp -n 2 --steps 3 --batch 8" in run.stdout


@pytest.mark.timeout(120)
def test_the_pipeline_benchmark_compares_the_pipeline_with_one_process_and_torch(tmp_path):
    tag, env = tagged_env(tmp_path / "tmp")
    run = subprocess.run([sys.executable, "-m", "ringlib", "bench", "pipeline", "--stages", "3",
                          "--width", "64", "--layers", "3", "--batch", "8", "--micro-batch",
                          "4", "--batches", "2", "--rounds", "1", "--compare", "torch"],
                         env=env, cwd=tmp_path, capture_output=True, text=True, timeout=110)
    assert run.returncode == 0, run.stderr
    assert re.search(r"whole model, one process +\d+$", run.stdout, re.M), run.stdout
    for api in (r"asyncio arun\(\)", r"blocking run\(\)"):
        assert re.search(rf"ringlib pipeline, 3 peers, {api} +\d+ +[\d.]+x alone, [\d.]+x "
                         "torch$", run.stdout, re.M), run.stdout
    assert re.search(r"ScheduleGPipe +\d+ +[\d.]+x alone$", run.stdout, re.M), run.stdout
    assert re.search(r"one at a time: p50 [\d.]+ ms, p99 [\d.]+ ms; a batch's in the full pipe", run.stdout)
    assert re.search(r"serving requests of 1-8 rows at \d+ rows/s .*: latency p50 [\d.]+ ms",
                     run.stdout)
    assert "--stages 3" in run.stdout and "--compare torch" in run.stdout
    assert_none_left(tag)
    wrong = subprocess.run([sys.executable, "-m", "ringlib", "bench", "pipeline", "--compare",
                            "mpi"], capture_output=True, text=True, timeout=60)
    assert wrong.returncode == 2 and "unknown system to compare with mpi; choose from torch" in wrong.stderr


@needs_hosts
def test_the_two_host_benchmark_compares_hierarchical_flat_and_gloo_and_counts_bytes(tmp_path):
    """With the timelines of ringlib's ranks, which show the hierarchy's phases."""
    done = bench(tmp_path, "hosts", "--rounds", "1", "--iters", "2", "--size", "1MiB",
                 "--timeline", str(tmp_path / "tl"))
    rows = {line.split()[0]: line.split() for line in done.stdout.splitlines()
            if line.split()[:1] and line.split()[0] in ("hierarchical", "flat", "gloo")}
    assert [rows[s][1] for s in ("hierarchical", "flat")] == ["hierarchical", "mesh-ring"], \
        done.stdout
    # 2 hosts of 2: the flat ring carries 1.5x S across, the hierarchical one S (its least)
    assert float(rows["hierarchical"][-2]) < float(rows["flat"][-2]), done.stdout
    assert all(re.fullmatch(r"[\d.]+|-", rows[s][-1]) for s in rows), done.stdout  # +mem MiB
    for system in ("hierarchical", "flat"):
        for rank in range(4):
            events = json.loads((tmp_path / "tl" / system / f"trace-{rank}.json").read_text())
            names = {e["name"] for e in events["traceEvents"]}
            assert "ringlib:all_reduce" in names, (system, rank, names)
    hierarchical = json.loads((tmp_path / "tl" / "hierarchical" / "trace-0.json").read_text())
    waited = {e["name"] for e in hierarchical["traceEvents"] if e["name"].startswith("wait")}
    assert waited == {"wait for rank 1", "wait for rank 2"}, waited  # its host's, its slice's
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert "rlh" not in listed, f"namespaces left behind: {listed}"


@pytest.mark.timeout(60)
def test_the_loopback_floor_is_timed_over_several_sockets_and_with_zerocopy_sends(tmp_path):
    run = bench(tmp_path, "loopback", "--sizes", "8B,1MiB", "--iters", "3", "--rounds", "2",
                "--sockets", "1,2", "--zerocopy")
    for way in ("1 socket", "2 sockets", "1 socket, zerocopy", "2 sockets, zerocopy"):
        for size in ("8 B", "1 MiB"):
            copied = r"\d+%" if "zerocopy" in way else "-"
            line = rf"^ *{way} +{size} +{NUMBER}/{NUMBER} +{NUMBER} +{copied}$"
            assert re.search(line, run.stdout, re.M), (line, run.stdout)


@needs_hosts
def test_the_loopback_floor_between_two_hosts_runs_over_veth_and_deletes_them(tmp_path):
    run = bench(tmp_path, "loopback", "--hosts", "--sizes", "64KiB,1MiB", "--iters", "3")
    assert "two network namespaces joined by veth" in run.stdout, run.stdout
    assert re.search(rf"^ *1 socket +1 MiB +{NUMBER} +{NUMBER} +-$", run.stdout, re.M), run.stdout
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert "rlh" not in listed, f"namespaces left behind: {listed}"


@pytest.mark.parametrize("args, message", [
    (["--sockets", "0"], "connection counts must be 1 or more"),
    (["--transport", "ipc", "--zerocopy"], "--zerocopy and --hosts need --transport tcp"),
    (["--rounds", "0"], "--iters and --rounds must be 1 or more"),
])
def test_the_loopback_floor_refuses_bad_arguments(args, message):
    run = subprocess.run([sys.executable, "-m", "ringlib", "bench", "loopback", *args],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and message in run.stderr, run.stderr


@pytest.mark.timeout(120)
def test_the_admission_benchmark_times_an_idle_admit_beside_an_all_reduce_and_a_join(tmp_path):
    run = bench(tmp_path, "admission", "-n", "2", "--trials", "1", "--calls", "100",
                "--json", str(tmp_path / "a.json"))
    assert re.search(rf"admit\(\)/all_reduce +{NUMBER} ", run.stdout), run.stdout
    assert re.search(rf"admitting one newcomer +{NUMBER} ms", run.stdout), run.stdout
    (trial,) = json.loads((tmp_path / "a.json").read_text())["trials"]
    assert trial["admit_idle_us"] > 0 and trial["to_first_collective_ms"] >= trial["admit_ms"]


@pytest.mark.timeout(120)
def test_the_observing_benchmark_times_the_recorder_and_the_timeline_on_both_apis(tmp_path):
    run = bench(tmp_path, "observing", "--sizes", "8B", "--calls", "100")
    for api in ("blocking", "asyncio"):
        assert re.search(rf"^ +{api} +8 B( +{NUMBER}){{5}}$", run.stdout, re.M), run.stdout
