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
from ring_harness import run_ring
from ringlib import InvalidArgument
from ringlib.runtime.timeline import Timeline, path_for
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


@pytest.mark.parametrize("ending", ["die", "interrupt"])
def test_a_rank_ended_by_an_exception_ctrl_c_or_sigterm_leaves_a_valid_trace(tmp_path, ending):
    # No periodic write: what is on disk comes from the exit and SIGTERM handlers.
    done = launch(tmp_path, 2, ending, "--timeline", str(tmp_path / "traces"),
                  RINGLIB_TIMELINE_FLUSH_S="3600")
    # rank 1's RuntimeError or KeyboardInterrupt; rank 0 got SIGTERM from the launcher
    assert done.returncode == (1 if ending == "die" else 130), done.stderr
    assert ("rank 1 fails on purpose" if ending == "die" else "KeyboardInterrupt") in done.stderr
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


def test_a_rank_on_another_host_measures_its_clock_against_rank_0s(tmp_path):
    """Rank 2 on its own loopback address counts as another host: its timeline takes
    the offset it measured to rank 0 (CLOCK questions), and the merge still aligns."""
    traces = tmp_path / "traces"
    finished = run_ring("late", 3, "tcp", 0, {"RINGLIB_TIMELINE": str(traces)},
                        timeout=90, peer=Path(PEER), hosts=2)
    assert all(f.returncode == 0 for f in finished), [f.stderr[-2000:] for f in finished]
    clocks = [json.loads((traces / f"trace-{r}.json").read_text())["otherData"]["clock"]
              for r in range(3)]
    assert clocks[2] == "rank 0's, measured at start" and "one host" in clocks[1], clocks
    ends: dict[tuple, list[float]] = {}
    for s in collectives([e for r in range(3) for e in trace(traces / f"trace-{r}.json")]):
        ends.setdefault(s["key"], []).append(s["start"] + s["duration"])
    assert len(ends) == 5 and all(len(e) == 3 and max(e) - min(e) < 50_000
                                  for e in ends.values()), ends


def test_gradient_buckets_and_pipeline_micro_batches_are_on_the_timeline(tmp_path):
    done = launch(tmp_path, 2, "work", "--timeline", str(tmp_path / "traces"))
    assert done.returncode == 0, f"seed {done.seed}: {done.stderr}"
    flows: dict[str, list[str]] = {}
    for rank in range(2):
        events = trace(tmp_path / "traces" / f"trace-{rank}.json")
        names = [e["name"] for e in events]
        ready = [n for n in names if n.endswith(" ready")]
        reduced = [n for n in names if n.startswith("bucket ") and n.endswith("all-reduce")]
        assert len(ready) >= 2 and len(reduced) == len(ready), f"rank {rank}: {names}"
        assert "synchronize() wait" in names
        stages = {n.split(" #")[0] for n in names if " #" in n}
        assert {"compute", "send"} <= stages and ("wait for input" in stages or rank == 0)
        for e in events:
            if e["ph"] in "sf" and e.get("name") == "micro-batch":
                flows.setdefault(e["id"], []).append(e["ph"])
        counts = [e for e in events if e["ph"] == "C"]
        assert bool(counts) == (rank == 0), "rank 0 counts the micro-batches in flight"
    # Every arrow starts on one rank and ends on the other: 4 micro-batches there and back.
    assert len(flows) >= 8 and all(sorted(v) == ["f", "s"] for v in flows.values()), flows


def test_a_lost_peer_dumps_the_recorder_and_marks_the_loss_and_the_reform(tmp_path):
    traces, flights = tmp_path / "traces", tmp_path / "flight"
    env = {"RINGLIB_TIMELINE": str(traces / "trace-{rank}.json"),
           "RINGLIB_FLIGHT_DIR": str(flights),
           "RINGLIB_PEER_TIMEOUT": "1.5", "RINGLIB_HEARTBEAT_S": "0.25"}
    finished = run_ring("lost", 3, "tcp", 0, env, timeout=90, peer=Path(PEER),
                        expendable=frozenset({2}))
    log = "\n".join(f"--- rank {f.rank} exit {f.returncode}\n{f.stdout}{f.stderr[-2000:]}"
                    for f in finished)
    for rank in (0, 1):
        assert finished[rank].returncode == 0, log
        assert f"rank {rank} lost a peer" in finished[rank].stdout, log
        assert "PeerLost" in "".join(p.read_text() for p in flights.glob(f"flight-rank{rank}-*"))
        names = [e["name"] for e in trace(traces / f"trace-{rank}.json") if e["ph"] == "i"]
        assert "PeerLost" in names and "reform" in names, f"rank {rank}: {names}"
        assert names.index("PeerLost") < names.index("reform")


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


def test_a_timeline_path_names_each_ranks_file_and_refuses_one_file_for_several():
    assert path_for("/t/trace-{rank}.json", 3, 4) == "/t/trace-3.json"
    assert path_for("/t/traces", 3, 4) == "/t/traces/trace-3.json"  # a directory
    assert path_for("/t/one.json", 0, 1) == "/t/one.json"
    with pytest.raises(InvalidArgument, match=r"rank 1: .*one.json is one file for 2 ranks"):
        path_for("/t/one.json", 1, 2)
