"""The chaos benchmark (bench/chaos.py), short: rings of 3 real processes lose a rank to
SIGKILL or SIGSTOP while running collectives or during start-up; every survivor must
report the loss, nothing may hang, no result may be wrong and nothing may be left; with
--reform the survivors must form one ring and agree. Its verdict, on made-up trials.

The full run (20 trials of 4 ranks, and again with --reform) is `make chaos`.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest

from leftovers import assert_none_left, tagged_env
from ringlib.bench.chaos import problems, parser

CASES = "kill:running,stop:running,kill:start-up"
FAST = ["-n", "3", "--collectives", "30", "--startup-window", "1", "--timeout", "40"]


def chaos(tmp_path: Path, seed: int, *args: str) -> tuple[subprocess.CompletedProcess, dict]:
    """Run the benchmark with a tag in its environment; check that no process outlives
    it; return the run and its JSON document."""
    out = tmp_path / "chaos.json"
    tag, env = tagged_env(tmp_path / "tmp")
    run = subprocess.run([sys.executable, "-m", "ringlib.bench.chaos", *FAST, "--seed",
                          str(seed), "--json", str(out), *args], env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=150)
    assert_none_left(tag)
    assert out.exists(), f"seed {seed}\n{run.stdout}\n{run.stderr}"
    return run, json.loads(out.read_text())


def assert_clean(run: subprocess.CompletedProcess, document: dict, seed: int) -> None:
    """Exit 0; in every trial no hang, no wrong result, nothing left, and every survivor
    raised an error that reports the loss."""
    log = f"seed {seed}\n{run.stdout}\n{run.stderr}"
    assert run.returncode == 0, log
    for trial in document["trials"]:
        assert trial["problems"] == [], log
        assert not any(trial["left"].values()) and not trial["left_after_cleanup"], log
        for rank in trial["ranks"]:
            assert rank["wrong"] == [], log
            if not rank["victim"]:
                assert rank["hung"] is None and rank["exit"] == 0, log
                assert rank["raised"] is not None and rank["detection_s"] > 0, log


@pytest.mark.timeout(180)
def test_every_survivor_reports_a_kill_or_stop_and_re_forms(tmp_path, seed):
    """A kill and a stop while running, then a kill during start-up; with --reform the
    survivors of the first two form one ring of 2 and hold the same results."""
    run, document = chaos(tmp_path, seed, "--trials", "3", "--cases", CASES, "--reform")
    assert_clean(run, document, seed)
    moments = [t["moment"] for t in document["trials"]]  # the start-up kill: within 1 s
    assert moments[:2] == ["running", "running"] and moments[2] != "running", \
        f"seed {seed}: {moments}"
    for trial in document["trials"][:2]:
        victim = trial["plan"]["victim"]
        survivors = [r for r in trial["ranks"] if not r["victim"]]
        assert all(r["raised"]["type"] == "PeerLost" and r["raised"]["lost_rank"] == victim
                   for r in survivors), f"seed {seed}: {survivors}"
        rings = [r["reformed"] for r in survivors]
        assert sorted(g["rank"] for g in rings) == [0, 1], f"seed {seed}: {rings}"
        assert {g["world_size"] for g in rings} == {2}, f"seed {seed}: {rings}"
        assert len({g["digest"] for g in rings}) == 1, f"seed {seed}: {rings}"
    assert f"--seed {seed}" in run.stdout  # the command that replays the run


@pytest.mark.timeout(120)
def test_without_re_forming_the_survivors_of_a_kill_just_leave(tmp_path, seed):
    """--trial replays one trial of a run; without --reform nobody re-forms."""
    run, document = chaos(tmp_path, seed, "--trials", "3", "--cases", CASES, "--trial", "1")
    assert_clean(run, document, seed)
    [trial] = document["trials"]
    assert trial["trial"] == 1 and trial["moment"] == "running", f"seed {seed}: {trial}"
    assert all(r["reformed"] is None for r in trial["ranks"]), f"seed {seed}: {trial}"


def clean_trial() -> dict:
    """A made-up trial of 3 ranks in which rank 2 was killed while running, and all went well."""
    def survivor(rank: int) -> dict:
        return {"rank": rank, "victim": False, "exit": 0, "hung": None, "wrong": [],
                "detection_s": 1.0, "stderr": "", "reformed": None,
                "raised": {"type": "PeerLost", "lost_rank": 2, "phase": "running",
                           "message": "rank 2 sent nothing", "i": 7}}
    victim = {**survivor(2), "victim": True, "exit": -9, "raised": None, "detection_s": None}
    return {"trial": 1, "plan": {"victim": 2}, "moment": "running",
            "ranks": [survivor(0), survivor(1), victim],
            "left": {"processes": [], "shm": [], "files": []}, "left_after_cleanup": []}


def test_the_verdict_flags_hangs_wrong_results_leftovers_and_misreported_losses():
    args = parser().parse_args([])
    assert problems(args, clean_trial()) == []
    faults = {
        "hung": lambda t: t["ranks"][0].update(hung="raised nothing within 5 s"),
        "wrong result": lambda t: t["ranks"][2]["wrong"].append("running: element 3 is 1.0"),
        "left behind": lambda t: t["left"]["shm"].append("ringlib-chaos-x-2-0-ab"),
        "outlived the cleanup": lambda t: t["left_after_cleanup"].append("1234"),
        "did not report the loss of rank 2": lambda t: t["ranks"][1]["raised"].update(
            lost_rank=0),
        "without raising": lambda t: t["ranks"][1].update(raised=None, detection_s=None),
        "before the fault": lambda t: t["ranks"][0].update(detection_s=-0.5),
        "exited 1": lambda t: t["ranks"][0].update(exit=1),
    }
    for words, spoil in faults.items():
        trial = copy.deepcopy(clean_trial())
        spoil(trial)
        found = problems(args, trial)
        assert len(found) == 1 and words in found[0], (words, found)


def test_re_formed_survivors_must_agree_on_the_ring_and_its_results():
    args = parser().parse_args(["--reform"])
    trial = clean_trial()
    for r in (0, 1):
        trial["ranks"][r]["reformed"] = {"rank": r, "world_size": 2, "digest": "ab"}
    assert problems(args, trial) == []
    split = copy.deepcopy(trial)
    split["ranks"][1]["reformed"].update(rank=0, world_size=1)
    assert any("disagree" in p for p in problems(args, split))
    differ = copy.deepcopy(trial)
    differ["ranks"][1]["reformed"]["digest"] = "cd"
    assert any("different results" in p for p in problems(args, differ))
    missing = copy.deepcopy(trial)
    missing["ranks"][1]["reformed"] = None
    assert any("did not re-form" in p for p in problems(args, missing))
