"""The network-fault benchmark for real: ranks in network namespaces, clean and faulty
links side by side, every result checked, and nothing left behind, even on SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid

import pytest

from leftovers import assert_none_left, tagged_env
from ringlib.bench import netem

pytestmark = pytest.mark.timeout(120)
BENCH = [sys.executable, "-m", "ringlib.bench.netem"]


@pytest.fixture(scope="module")
def namespaces_work() -> None:
    """Skip, saying why, where this process cannot make a network namespace."""
    if os.geteuid() != 0:
        pytest.skip(reason="the netem benchmark needs root to create network namespaces")
    probe = f"rl-probe-{uuid.uuid4().hex[:6]}"
    done = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    if done.returncode != 0:
        pytest.skip(reason=f"`ip netns add` fails here: {done.stderr.strip()}")


def namespaces_of(pid: int) -> list[str]:
    """Namespaces the benchmark with this pid made (it names them rl-PID-...)."""
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return [line.split()[0] for line in listed.splitlines() if line.startswith(f"rl-{pid}-")]


def test_clean_and_faulty_links_side_by_side_every_result_checked(tmp_path, namespaces_work):
    tag, env = tagged_env(tmp_path / "tmp")
    out = tmp_path / "netem.json"
    proc = subprocess.Popen([*BENCH, "--sizes", "8B,256KiB", "--iters", "2", "--delay", "5ms",
                             "--json", str(out)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    stdout, stderr = proc.communicate(timeout=90)
    assert proc.returncode == 0, stderr
    assert_none_left(tag)
    document = json.loads(out.read_text())
    assert not namespaces_of(proc.pid)
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not set(document["namespaces"]) & {line.split()[0] for line in listed.splitlines()}
    assert "clean" in stdout and "faulty" in stdout and "faulty/clean" in stdout
    assert f"seed {document['seed']}" in stdout
    ranks = document["ranks"]
    assert [row["bytes"] for row in document["rows"]] == [8, 256 << 10]
    for row in document["rows"]:
        for label in ("clean", "faulty"):
            cell = row[label]
            assert cell["checked"] == ranks * (2 + 1)  # the warm-up call and two timed ones
            assert cell["max_error"] < 1e-5 and cell["p50_s"] > 0 and cell["busbw_mbs"] > 0
        assert row["faulty"]["p50_s"] > 0.005  # the delay was on: every call waits for it
        assert row["faulty"]["frames"] > 0 and row["clean"]["dropped"] == 0
    assert "all ranks bit-identical" in stdout


def test_sigterm_stops_ranks_and_deletes_namespaces(tmp_path, namespaces_work):
    tag, env = tagged_env(tmp_path / "tmp")
    proc = subprocess.Popen([*BENCH, "--sizes", "16MiB", "--iters", "50"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("-----"):  # under the header: the ranks run, the links are up
            break
    assert namespaces_of(proc.pid)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "namespaces deleted" in stderr
    assert not namespaces_of(proc.pid)
    assert_none_left(tag)


def test_refuses_without_root(monkeypatch, capsys):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert netem.main(["--sizes", "8B"]) == 2
    assert "must run as root" in capsys.readouterr().err
