"""Timelines, the flight recorder and torch.profiler spans, with real ranks started by
`ringlib launch`: valid traces whatever ends a rank, `ringlib trace`'s merge and summary,
dumps on failures and on SIGUSR1."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from leftovers import assert_none_left, tagged_env
from ringlib.runtime.timeline import Timeline
from ringlib.runtime.trace_files import collectives

pytestmark = pytest.mark.timeout(180)
PEER = str(Path(__file__).with_name("timeline_peer.py"))
KINDS = {"all_reduce", "broadcast", "all_gather", "reduce_scatter", "barrier"}
# What each path's collectives show as phases inside their spans.
PATHS = {"compiled": ({}, {"compiled kernel"}),
         "mesh": ({"RINGLIB_SHM_BYTES": "0"}, {"mesh", "wait for rank", "send"}),
         "messages": ({"RINGLIB_SHM_BYTES": "0", "RINGLIB_MESH_BYTES": "0"},
                      {"wait for rank", "send", "reduce", "copy"})}


def launch(tmp: Path, n: int, mode: str, *launch_args: str, out: str = "-",
           **env: str) -> subprocess.CompletedProcess:
    seed = int.from_bytes(os.urandom(4), "little")
    tag, environment = tagged_env(tmp / f"tmp-{uuid.uuid4().hex[:6]}", **env)
    done = subprocess.run([sys.executable, "-m", "ringlib", "launch", "-n", str(n),
                           *launch_args, "--", sys.executable, PEER, mode, str(seed), out],
                          env=environment, capture_output=True, text=True, timeout=150)
    assert_none_left(tag)
    done.seed = seed
    return done


def trace(path: Path) -> list[dict]:
    with open(path) as source:  # json.load fails the test on anything but valid JSON
        return json.load(source)["traceEvents"]


def phases(events: list[dict]) -> set[str]:
    """The names of the phases nested in collective spans, less their rank numbers."""
    return {e["name"].split(":")[0].rstrip("0123456789 ") for e in events
            if e.get("cat") == "collective" and e["ph"] == "b"
            and not e["name"].startswith("ringlib:")}


@pytest.mark.parametrize("path", PATHS)
def test_a_launched_run_writes_a_valid_trace_per_rank_naming_every_collective(tmp_path, path):
    env, expected = PATHS[path]
    done = launch(tmp_path, 2, "all", "--timeline", str(tmp_path / "traces"), **env)
    assert done.returncode == 0, f"seed {done.seed}: {done.stderr}"
    for rank in range(2):
        events = trace(tmp_path / "traces" / f"trace-{rank}.json")
        spans = [e for e in events if e["ph"] == "b" and e["name"].startswith("ringlib:")]
        assert {e["name"][8:] for e in spans} == KINDS, f"seed {done.seed}"
        assert [e["args"]["seq"] for e in spans] == sorted(e["args"]["seq"] for e in spans)
        for e in spans:
            assert e["pid"] == rank and e["args"]["outcome"] == "done"
            assert {"generation", "bytes", "signature"} <= set(e["args"])
        sizes = {e["args"]["bytes"] for e in spans if e["name"] == "ringlib:all_reduce"}
        assert sizes == {12, 280_000, 2_400_000}
        assert {e["args"]["algorithm"] for e in spans} - {""}, "no algorithm named"
        assert expected <= phases(events), f"{path}: phases {phases(events)}"


def test_the_timeline_starts_and_stops_at_run_time(tmp_path):
    done = launch(tmp_path, 2, "runtime", out=str(tmp_path / "t-{rank}.json"))
    assert done.returncode == 0, done.stderr
    for rank in range(2):
        names = [e["name"] for e in trace(tmp_path / f"t-{rank}.json") if e["ph"] == "b"
                 and e["name"].startswith("ringlib:")]
        assert names.count("ringlib:barrier") == 1  # the barriers before and after: not in
        assert names.count("ringlib:all_reduce") == 3


def test_a_rank_ended_by_an_exception_or_by_sigterm_leaves_a_valid_trace(tmp_path):
    # No periodic write: what is on disk comes from the exit and SIGTERM handlers.
    done = launch(tmp_path, 2, "die", "--timeline", str(tmp_path / "traces"),
                  RINGLIB_TIMELINE_FLUSH_S="3600")
    assert done.returncode == 1, done.stderr  # rank 1's RuntimeError; rank 0 got SIGTERM
    assert "rank 1 fails on purpose" in done.stderr
    for rank in range(2):
        names = {e["name"] for e in trace(tmp_path / "traces" / f"trace-{rank}.json")}
        assert {f"ringlib:{k}" for k in KINDS} <= names, f"rank {rank}: {sorted(names)}"


def test_the_merge_aligns_the_ranks_and_the_summary_names_the_late_one(tmp_path):
    done = launch(tmp_path, 3, "late", "--timeline", str(tmp_path / "traces"))
    assert done.returncode == 0, done.stderr
    files = sorted(str(p) for p in (tmp_path / "traces").glob("trace-*.json"))
    merged = tmp_path / "merged.json"
    summary = subprocess.run([sys.executable, "-m", "ringlib", "trace", *files, "-o",
                              str(merged)], capture_output=True, text=True, timeout=60)
    assert summary.returncode == 0, summary.stderr
    late = [line for line in summary.stdout.splitlines() if "<- the late rank" in line]
    assert len(late) == 1 and late[0].split()[1] == "2", summary.stdout
    spans = collectives(trace(merged))
    assert {s["rank"] for s in spans} == {0, 1, 2}
    ends: dict[tuple, list[float]] = {}
    for s in spans:
        ends.setdefault(s["key"], []).append(s["start"] + s["duration"])
    # All three finish an all-reduce together, after the late rank came (0.3 s late).
    assert all(len(e) == 3 and max(e) - min(e) < 50_000 for e in ends.values()), ends


def test_the_flight_recorder_dumps_on_a_timeout_and_on_sigusr1(tmp_path):
    flights = tmp_path / "flight"
    done = launch(tmp_path, 2, "timeout", RINGLIB_FLIGHT_DIR=str(flights))
    assert done.returncode == 0, done.stderr
    assert "rank 0 timed out" in done.stdout
    (first,) = flights.glob("flight-rank0-*.txt")
    text = first.read_text()
    assert "CollectiveTimeout" in text and "waiting for rank 1" in text, text
    assert "all_reduce float32[10] sum" in text and "ringlib flight recorder, rank 0" in text
    (second,) = flights.glob("flight-rank1-*.txt")
    assert "SIGUSR1" in second.read_text()
    assert "ringlib flight recorder, rank 0" in done.stderr  # the log has it too


def test_the_flight_recorder_dumps_a_mismatch_on_every_rank(tmp_path):
    flights = tmp_path / "flight"
    done = launch(tmp_path, 2, "mismatch", RINGLIB_FLIGHT_DIR=str(flights))
    assert done.returncode == 0, done.stderr
    for rank in range(2):
        assert f"rank {rank} mismatched" in done.stdout
        (dump,) = flights.glob(f"flight-rank{rank}-*.txt")
        assert "MismatchError" in dump.read_text()


def test_a_torch_profiler_trace_holds_the_collective_on_the_calling_thread(tmp_path):
    done = launch(tmp_path, 2, "profile", out=str(tmp_path / "profile.json"))
    assert done.returncode == 0, done.stderr
    names = {e.get("name") for e in trace(tmp_path / "profile.json")}
    assert "ringlib:all_reduce" in names
    threads = next(line for line in done.stdout.splitlines() if "threads" in line)
    assert len(eval(threads.split("threads", 1)[1])) == 1, threads  # beside aten::mul


def test_a_timeline_keeps_its_newest_events_under_its_cap(tmp_path):
    timeline = Timeline(str(tmp_path / "t.json"), 0, cap=10)
    for i in range(25):
        timeline.instant(f"event {i}")
    timeline.close()
    document = json.loads((tmp_path / "t.json").read_text())
    kept = [e["name"] for e in document["traceEvents"] if e["ph"] == "i"]
    assert kept == [f"event {i}" for i in range(15, 25)]
    assert document["otherData"]["events_dropped"] == 15


def test_trace_and_launch_refuse_what_is_not_a_trace_or_a_directory(tmp_path):
    (tmp_path / "bad.json").write_text("{not json")
    for files in (["bad.json"], ["missing.json"]):
        done = subprocess.run([sys.executable, "-m", "ringlib", "trace", *files],
                              cwd=tmp_path, capture_output=True, text=True, timeout=60)
        assert done.returncode == 2 and files[0] in done.stderr, done.stderr
    (tmp_path / "file").write_text("")
    done = subprocess.run([sys.executable, "-m", "ringlib", "launch", "-n", "1", "--timeline",
                           str(tmp_path / "file" / "x"), "--", "true"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "--timeline" in done.stderr, done.stderr


def test_the_flight_recorder_keeps_what_it_is_told_and_nothing_when_off(tmp_path):
    """RINGLIB_FLIGHT_KEPT's recorder: the newest `kept`; 0 records nothing, unless a
    timeline is on, which sees every collective as it closes."""
    from ringlib.collectives.flight import FlightRecorder
    recorder = FlightRecorder(0, kept=3)
    for seq in range(5):
        recorder.closed(recorder.opened(seq, "all_reduce float32[2] sum", 8, None))
    assert [e[0] for e in recorder.entries] == [2, 3, 4]
    recorder.keep(0)
    assert recorder.opened(5, "barrier", 0, None) is None and not recorder.entries
    recorder.closed(None)  # a collective opened while off closes as nothing
    timeline = Timeline(str(tmp_path / "t.json"), 0)
    recorder.timeline = timeline
    recorder.closed(recorder.opened(6, "barrier", 0, None))
    timeline.close()
    assert any(e["name"] == "ringlib:barrier" for e in trace(tmp_path / "t.json"))
    assert not recorder.entries
