"""One chaos trial, from the draw of its plan to its record: the ranks started as real
processes, their reports followed, the victim struck at its moment, every survivor past
its deadline killed, and what the trial left behind counted.

Its deadlines, what each moment means and what a record holds are the benchmark's rules,
written out in bench/chaos.py's docstring (`ringlib bench chaos -h`); that module judges
the records and prints them. Each rank runs bench/chaos_rank.py.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from ringlib.runtime import processes
from ringlib.runtime.environment import without_placement
from ringlib.transport.addresses import local_addresses
from ringlib.transport.segment_names import (DIRECTORY, JOB_VARIABLE, PREFIX,
                                             remove_job_segments)

FAULTS = {"kill": signal.SIGKILL, "stop": signal.SIGSTOP}
MOMENTS = ("start-up", "running")     # what a plan draws
# What a fault turns out to have hit: the victim still loading the runtime, before its
# connect() began; some rank still in connect(); or a ring that had formed on every rank.
OBSERVED = ("before connect", "connecting", "running")
TRANSPORTS = ("tcp", "ipc")
MARGIN_S = 2.0          # beyond 3 x peer timeout (and the connect timeout at start-up)
EXIT_S = 10.0           # how long a survivor may take to leave after it raised: closing
                        # waits up to 2 s for what it still queues (CLOSE_LINGER_S), and
                        # the interpreter's exit takes 1-2 s more on a loaded 2-core host
REAP_S = 5.0            # how long a killed process may take to be reaped


@dataclass(frozen=True)
class Plan:
    """One trial's draw: who fails, how and when, over which transport, and its seed."""

    trial: int
    victim: int
    fault: str
    moment: str
    delay: float      # start-up: seconds after the victim's process started
    after: int        # running: collectives the victim finishes before the fault
    transport: str
    seed: int

    def __str__(self) -> str:
        when = (f"{self.delay:.2f} s into start-up" if self.moment == "start-up"
                else f"after {self.after} collectives")
        return f"{self.fault} rank {self.victim} {when}, {self.transport}"


def plan_trial(args: argparse.Namespace, trial: int) -> Plan:
    """Trial `trial` of the run of args.seed; every draw is made, given or not, so that
    --cases and --transport change nothing else."""
    rng = np.random.default_rng([args.seed, trial])
    victim = int(rng.integers(args.ranks))
    fault, moment = str(rng.choice(list(FAULTS))), str(rng.choice(MOMENTS))
    delay, after = float(rng.uniform(0, args.startup_window)), int(rng.integers(args.collectives))
    transport, seed = str(rng.choice(TRANSPORTS)), int(rng.integers(2**32))
    if args.cases:
        fault, moment = args.cases[(trial - 1) % len(args.cases)]
    if args.transport != "both":
        transport = args.transport
    return Plan(trial, victim, fault, moment, delay, after, transport, seed)


@dataclass
class RankState:
    """What the parent knows of one rank: its process and the lines it reported."""

    proc: subprocess.Popen
    started: float
    joining: float | None = None
    ready: float | None = None
    done: int = 0                          # checked collectives of the first ring
    wrong: list[str] = field(default_factory=list)
    failure: dict[str, Any] | None = None  # its first "failed" line
    reformed: dict[str, Any] | None = None
    hung: str | None = None                # why the parent judged it hung and killed it
    exit: int | None = None
    eof: bool = False                      # its stdout has ended
    closed: float | None = None            # when it had closed its ring
    exited: float | None = None            # when the parent saw it gone

    def take(self, line: dict[str, Any]) -> None:
        kind = line["kind"]
        if kind == "joining":
            self.joining = line["t"]
        elif kind == "ready":
            self.ready = line["t"]
        elif kind in ("ok", "wrong"):
            self.done += line["phase"] == "running"
            if kind == "wrong":
                self.wrong.append(f"{line['phase']}: {line['why']}")
        elif kind == "failed" and self.failure is None:
            self.failure = line
        elif kind == "reformed":
            self.reformed = line
        elif kind == "closed":
            self.closed = line["t"]


def _pump(rank: int, stream: TextIO, lines: queue.Queue) -> None:
    """Hand on a rank's lines, then None at the end of its output."""
    with stream:
        for line in stream:
            lines.put((rank, line))
    lines.put((rank, None))


class Trial:
    """One trial's ranks, from their start to the count of what they left: follows their
    lines, strikes the victim at its moment, and judges every survivor."""

    def __init__(self, args: argparse.Namespace, plan: Plan, work: str, logs: str) -> None:
        self.args, self.plan, self.work, self.logs = args, plan, work, logs
        self.job = f"chaos-{uuid.uuid4().hex[:10]}-t{plan.trial}"
        self.tag = f"{JOB_VARIABLE}={self.job}"
        self.lines: queue.Queue[tuple[int, str | None]] = queue.Queue()
        self.ranks: list[RankState] = []
        self.fault_t: float | None = None
        self.startup_fault = False  # some rank's connect() had not returned at the fault

    def start(self) -> None:
        """One process per rank, placed by RINGLIB_* variables, with the job in its
        environment; each one's stdout read by a thread of its own."""
        peers = local_addresses(self.args.ranks, self.plan.transport, self.work)
        tmp = os.path.join(self.work, "tmp")
        os.mkdir(tmp)
        base = {**without_placement(os.environ), JOB_VARIABLE: self.job, "TMPDIR": tmp,
                "PYTHONUNBUFFERED": "1", "RINGLIB_WORLD_SIZE": str(len(peers)),
                "RINGLIB_PEERS": ",".join(peers)}
        for rank in range(len(peers)):
            with open(os.path.join(self.logs, f"rank{rank}.stderr"), "w") as err:
                proc = processes.start([sys.executable, "-m", "ringlib.bench.chaos_rank",
                                        *self.rank_args()], {**base, "RINGLIB_RANK": str(rank)},
                                       stdout=subprocess.PIPE, stderr=err, text=True)
            self.ranks.append(RankState(proc, time.monotonic()))
            threading.Thread(target=_pump, args=(rank, proc.stdout, self.lines),
                             daemon=True).start()

    def rank_args(self) -> list[str]:
        """What every rank runs with: the trial's seed, its timeouts and a watchdog."""
        a = self.args
        return ["--seed", str(self.plan.seed), "--connect-timeout", str(a.connect_timeout),
                "--peer-timeout", str(a.peer_timeout), "--heartbeat", str(a.heartbeat),
                "--collective-timeout", str(self.detect_bound(True)),
                "--limit", str(a.timeout + 10)] + ["--reform"] * a.reform

    def detect_bound(self, startup: bool) -> float:
        """Seconds a survivor may take to raise after the fault (see bench/chaos.py's doc)."""
        a = self.args
        return 3 * a.peer_timeout + MARGIN_S + (a.connect_timeout if startup else 0.0)

    def survivors(self) -> list[int]:
        """Every rank but the victim."""
        return [r for r in range(len(self.ranks)) if r != self.plan.victim]

    def follow(self) -> None:
        """Take lines, strike, judge, until every survivor has exited or hung, or the
        trial's time is up (whatever still runs then is hung)."""
        end = self.ranks[0].started + self.args.timeout
        while not self.over():
            now = time.monotonic()
            if now > end:
                for r in self.survivors():
                    self.hang(r, f"still running {self.args.timeout:g} s into the trial")
                break
            self.drain(0.02)
            self.strike_if_due()
            self.judge(time.monotonic())

    def drain(self, wait: float) -> None:
        """Hand every line that came (waiting up to `wait` for the first) to its rank."""
        try:
            rank, line = self.lines.get(timeout=wait)
            while True:
                if line is None:
                    self.ranks[rank].eof = True
                elif line.startswith("{") and line.rstrip().endswith("}"):
                    self.ranks[rank].take(json.loads(line))
                else:  # not the rank's report, or the part of one a kill cut short
                    sys.stderr.write(f"rank {rank}: {line}")
                rank, line = self.lines.get_nowait()
        except queue.Empty:
            pass

    def strike_if_due(self) -> None:
        """Send the fault once its moment has come, or at once if a rank failed or
        exited before it (then nothing waits for a moment that will not come)."""
        if self.fault_t is not None:
            return
        victim, p = self.ranks[self.plan.victim], self.plan
        everyone_ready = all(s.ready is not None for s in self.ranks)
        due = (time.monotonic() >= victim.started + p.delay if p.moment == "start-up"
               else everyone_ready and victim.done >= p.after)
        early = any(s.failure or s.proc.poll() is not None for s in self.ranks)
        if due or early:
            self.startup_fault = not everyone_ready
            self.fault_t = time.monotonic()
            processes.signal_group(victim.proc.pid, FAULTS[p.fault])

    def judge(self, now: float) -> None:
        """Note exits; kill each survivor past its deadline, and say why."""
        for r in self.survivors():
            s = self.ranks[r]
            if s.exit is None and s.hung is None:
                s.exit = s.proc.poll()
                s.exited = now if s.exit is not None else None
            if s.exit is not None or s.hung is not None or self.fault_t is None:
                continue
            if s.failure is None:
                deadline = self.detect_deadline(s)
                if deadline is not None and now > deadline:
                    self.hang(r, f"raised nothing within "
                              f"{self.detect_bound(self.startup_fault):g} s of the fault")
            elif now > s.failure["t"] + self.exit_bound():
                self.hang(r, f"raised {s.failure['type']} but had not "
                          f"{'re-formed and ' * self.args.reform}exited "
                          f"{self.exit_bound():g} s later")

    def detect_deadline(self, s: RankState) -> float | None:
        """When a survivor that has not raised is hung; None while it has not begun to
        connect after a start-up fault (the trial's own limit bounds that)."""
        if not self.startup_fault:
            return self.fault_t + self.detect_bound(False)
        if s.joining is None:
            return None
        return max(self.fault_t, s.joining) + self.detect_bound(True)

    def exit_bound(self) -> float:
        """Seconds a survivor may take to exit after it raised (re-forming included)."""
        a = self.args
        return EXIT_S + (4 * a.connect_timeout + 3 * a.peer_timeout if a.reform else 0.0)

    def hang(self, rank: int, why: str) -> None:
        """Judge a survivor hung for `why`, kill its group and reap it, unless it is gone."""
        s = self.ranks[rank]
        if s.exit is None and s.hung is None and s.proc.poll() is None:
            s.hung = why
            processes.signal_group(s.proc.pid, signal.SIGKILL)
            _reap(s.proc)
        s.exit = s.proc.poll()

    def over(self) -> bool:
        """Whether the fault came and every survivor has exited or been judged hung."""
        return self.fault_t is not None and all(
            self.ranks[r].exit is not None or self.ranks[r].hung is not None
            for r in self.survivors())

    def end_victim(self) -> None:
        """Kill the victim (a stopped one is held till now) and reap it; take its last lines."""
        victim = self.ranks[self.plan.victim]
        processes.signal_group(victim.proc.pid, signal.SIGKILL)
        _reap(victim.proc)
        victim.exit = victim.proc.poll()
        end = time.monotonic() + REAP_S
        while not all(s.eof for s in self.ranks) and time.monotonic() < end:
            self.drain(0.02)

    def leftovers(self) -> dict[str, list[str]]:
        """What the trial's processes left, now that none of the ranks runs."""
        files = [os.path.relpath(os.path.join(d, f), self.work)
                 for d, dirs, names in os.walk(self.work) for f in names + dirs]
        return {"processes": [str(pid) for pid in processes.processes_with(self.tag)],
                "shm": sorted(os.path.basename(p) for p in
                              glob.glob(os.path.join(DIRECTORY, f"{PREFIX}{self.job}-*"))),
                "files": sorted(f for f in files if f != "tmp")}

    def clean_up(self) -> list[str]:
        """Kill and reap everything of the trial, remove its segments; what still runs."""
        processes.stop([s.proc for s in self.ranks], grace=0)
        remove_job_segments(self.job)
        return [str(pid) for pid in processes.processes_with(self.tag)]


def _reap(proc: subprocess.Popen) -> None:
    """Wait up to REAP_S for a killed process; one that outlives that is the clean-up's."""
    try:
        proc.wait(REAP_S)
    except subprocess.TimeoutExpired:
        pass


def run_trial(args: argparse.Namespace, plan: Plan) -> dict[str, Any]:
    """Run one trial in private directories and return its record (see record())."""
    work = tempfile.mkdtemp(prefix="rl-")  # short: ipc paths cap at 107 bytes
    logs = tempfile.mkdtemp(prefix="rl-logs-")
    trial = Trial(args, plan, work, logs)
    began = time.monotonic()
    try:
        trial.start()
        trial.follow()
        trial.end_victim()
        left = trial.leftovers()
    finally:
        left_after = trial.clean_up()
        stderr = {r: Path(logs, f"rank{r}.stderr").read_text(errors="replace")[-3000:]
                  for r in range(len(trial.ranks))}
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(logs, ignore_errors=True)
    return record(trial, left, left_after, stderr, time.monotonic() - began)


def record(trial: Trial, left: dict[str, list[str]], left_after: list[str],
           stderr: dict[int, str], seconds: float) -> dict[str, Any]:
    """The trial as JSON: its plan, when the fault came, each rank's outcome, leftovers."""
    p, start = trial.plan, trial.ranks[0].started
    return {"trial": p.trial, "plan": p.__dict__, "description": str(p),
            "moment": _observed_moment(trial),
            "fault_s": None if trial.fault_t is None else trial.fault_t - start,
            "ranks": [_rank_record(trial, r, stderr.get(r, "")) for r in range(len(trial.ranks))],
            "left": left, "left_after_cleanup": left_after, "seconds": seconds}


def _rank_record(trial: Trial, rank: int, stderr: str) -> dict[str, Any]:
    """One rank's outcome: its times (seconds into the trial), checks, first exception
    and its time after the fault, re-forming, and its stderr where it failed."""
    s, start, f = trial.ranks[rank], trial.ranks[0].started, trial.ranks[rank].failure
    times = {"joining": s.joining, "ready": s.ready, "closed": s.closed, "exited": s.exited}
    failed = s.exit not in (0, -signal.SIGKILL) or s.hung
    return {"rank": rank, "victim": rank == trial.plan.victim, "exit": s.exit, "hung": s.hung,
            **{f"{k}_s": None if v is None else v - start for k, v in times.items()},
            "checked": s.done, "wrong": s.wrong, "reformed": s.reformed,
            "raised": f and {k: f[k] for k in ("type", "message", "phase", "i", "lost_rank")},
            "detection_s": None if f is None or trial.fault_t is None else f["t"] - trial.fault_t,
            "stderr": stderr if failed else ""}


def _observed_moment(trial: Trial) -> str:
    """Which of OBSERVED the fault hit, from the times the ranks reported."""
    t, victim = trial.fault_t, trial.ranks[trial.plan.victim]
    if t is None or victim.joining is None or victim.joining > t:
        return "before connect"
    if any(s.ready is None or s.ready > t for s in trial.ranks):
        return "connecting"
    return "running"
