"""Chaos: rings of real processes that lose a random rank at a random moment, SIGKILLed
or SIGSTOPped, during start-up or amid random collectives; how fast every survivor
hears of it, and that nothing hangs, no result is wrong and nothing is left behind.

    ringlib bench chaos [-n 4] [--trials 20] [--seed S] [--trial K] [--reform]
        [--collectives 100] [--cases FAULT:MOMENT,...] [--transport tcp|ipc|both]
        [--peer-timeout 1] [--heartbeat 0.2] [--connect-timeout 5] [--startup-window 2.5]
        [--timeout 60] [--json out.json]

Trial K is drawn from (seed, K) alone (--trial K replays it): the victim rank, the fault
(kill: SIGKILL; stop: SIGSTOP, held to the end of the trial, then SIGKILL), the moment
(start-up: 0 to --startup-window seconds after the victim's process started; running:
once every rank's connect() has returned and the victim has finished 0 to
--collectives-1 collectives of its stream), the
transport, and the collectives (see chaos_rank.py: every result checked against the
float64 reference). --cases cycles given faults and moments instead of drawing them.
The table sorts each trial by what its fault hit: "before connect" (the victim was still
loading the runtime), "connecting" (some rank's connect() had not returned), "running".

Each trial is a job of its own (RINGLIB_JOB), which names its shared-memory segments and,
in every rank's environment, finds its processes. The detection time of a survivor is
the monotonic time its first exception was raised less the time of the fault (every
process on a host reads the same CLOCK_MONOTONIC). Every survivor must report the loss:
PeerLost naming the victim, or, for a fault before the ring formed, RendezvousTimeout or
PeerLost. A survivor is hung if it has not raised 3 x peer timeout + 2 s after the fault
(before the ring formed: the connect timeout more, counted from when its connect() began
if that came later), or has not exited 10 s after raising (--reform: 4 x connect
timeout + 3 x peer timeout more); it is killed then. After every survivor has exited or
been killed, and the victim too, the trial counts what is left of it: processes,
segments in /dev/shm and files in its private directory (ipc sockets, TMPDIR). Then the
parent removes all of it and counts again.

With --reform the survivors that raised PeerLost re-form, run a few more checked
collectives and report their new rank, world size and a digest of the results they
share: they must form one ring of all of them (for a fault while running, of every
survivor), ranks 0..M-1, with one digest. The run fails (exit 1) on any hang, wrong
result, leftover, survivor that did not report the loss, failed or disagreeing re-form,
or rank that crashed; every failure names its trial and the command that replays it.

This module judges the trials, prints them and reads the options; bench/chaos_trial.py
runs each trial and records it.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from .chaos_trial import FAULTS, MOMENTS, OBSERVED, TRANSPORTS, plan_trial, run_trial
from .results import write_json

STARTUP_RAISES = {"PeerLost", "RendezvousTimeout"}  # what a start-up fault may raise


def reported(trial: dict[str, Any], rank: dict[str, Any]) -> bool:
    """Whether a survivor's first exception reports the fault: PeerLost naming the
    victim; at start-up, also RendezvousTimeout, or PeerLost naming a rank that left."""
    raised, victim = rank["raised"], trial["plan"]["victim"]
    if raised is None:
        return False
    if trial["moment"] != "running":
        return raised["type"] in STARTUP_RAISES
    return raised["type"] == "PeerLost" and raised["lost_rank"] == victim


def problems(args: argparse.Namespace, trial: dict[str, Any]) -> list[str]:
    """Everything wrong with a trial; empty when it passed."""
    found = [f"rank {r['rank']}: wrong result: {w}" for r in trial["ranks"] for w in r["wrong"]]
    for r in (r for r in trial["ranks"] if not r["victim"]):
        found += _survivor_problems(trial, r)
    left = {what: names for what, names in trial["left"].items() if names}
    if left:
        found.append(f"left behind: {left}")
    if trial["left_after_cleanup"]:
        found.append(f"processes outlived the cleanup: {trial['left_after_cleanup']}")
    if args.reform:
        found += _reform_problems(trial)
    return found


def _survivor_problems(trial: dict[str, Any], r: dict[str, Any]) -> list[str]:
    name, raised = f"rank {r['rank']}", r["raised"]
    if r["hung"]:
        return [f"{name} hung: {r['hung']}"]
    if raised is None:
        return [f"{name} exited {r['exit']} without raising: {r['stderr'][-500:]}"]
    found = []
    if r["detection_s"] < 0:
        found.append(f"{name} raised {r['detection_s']:.2f} s before the fault")
    if not reported(trial, r):
        found.append(f"{name} did not report the loss of rank {trial['plan']['victim']}: "
                     f"{raised['type']} ({raised['phase']}): {raised['message']}")
    if r["exit"] != 0:
        found.append(f"{name} exited {r['exit']}: {r['stderr'][-500:]}")
    return found


def _reform_problems(trial: dict[str, Any]) -> list[str]:
    """The survivors that raised PeerLost while running must all re-form, into one ring
    of just them (of every survivor, for a fault while running), with one digest."""
    survivors = [r for r in trial["ranks"] if not r["victim"] and not r["hung"]]
    holders = [r for r in survivors if r["raised"] and r["raised"]["type"] == "PeerLost"
               and r["raised"]["phase"] == "running"]
    found = [f"rank {r['rank']} did not re-form: {r['raised']['type']} "
             f"({r['raised']['phase']}): {r['raised']['message']}"
             for r in holders if r["reformed"] is None]
    rings = [r["reformed"] for r in survivors if r["reformed"]]
    if not rings:
        return found
    if {g["world_size"] for g in rings} != {len(rings)} or \
            sorted(g["rank"] for g in rings) != list(range(len(rings))):
        found.append(f"re-formed rings disagree: {[(g['rank'], g['world_size']) for g in rings]}")
    if len({g["digest"] for g in rings}) > 1:
        found.append(f"re-formed ranks hold different results: {[g['digest'] for g in rings]}")
    if trial["moment"] == "running" and len(rings) != len(trial["ranks"]) - 1:
        found.append(f"{len(rings)} of {len(trial['ranks']) - 1} survivors re-formed")
    return found


def percentile(sorted_values: list[float], q: float) -> float:
    """The nearest-rank percentile: always a value that was measured."""
    return sorted_values[max(0, int(np.ceil(q / 100 * len(sorted_values))) - 1)]


def table(args: argparse.Namespace, trials: list[dict[str, Any]]) -> str:
    """One row per fault and moment: detection times over every survivor, what they
    raised, and the count of each kind of failure."""
    head = (f"{'fault':<5} {'moment':<14} {'trials':>6} {'survivors':>9} {'min s':>6} "
            f"{'p50 s':>6} {'p90 s':>6} {'max s':>6} {'hangs':>5} {'wrong':>5} "
            f"{'unrep.':>6} {'left':>4}" + (f" {'re-formed':>9}" if args.reform else "")
            + "  raised")
    lines = [head, "-" * len(head)]
    for fault in FAULTS:
        for moment in OBSERVED:
            group = [t for t in trials if t["plan"]["fault"] == fault and t["moment"] == moment]
            if group:
                lines.append(_row(args, fault, moment, group))
    return "\n".join(lines)


def _row(args: argparse.Namespace, fault: str, moment: str, group: list[dict[str, Any]]) -> str:
    survivors = [(t, r) for t in group for r in t["ranks"] if not r["victim"]]
    times = sorted(r["detection_s"] for _, r in survivors if r["detection_s"] is not None)
    spread = [f"{percentile(times, q):6.2f}" for q in (0, 50, 90, 100)] if times else ["-"] * 4
    raised: dict[str, int] = {}
    for _, r in survivors:
        key = r["raised"]["type"] if r["raised"] else "nothing"
        raised[key] = raised.get(key, 0) + 1
    counts = [sum(bool(r["hung"]) for _, r in survivors),
              sum(len(r["wrong"]) for t in group for r in t["ranks"]),
              sum(not r["hung"] and not reported(t, r) for t, r in survivors),
              sum(bool(t["left_after_cleanup"]) + sum(map(len, t["left"].values()))
                  for t in group)]
    cells = (f"{fault:<5} {moment:<14} {len(group):>6} {len(survivors):>9} "
             + " ".join(f"{c:>6}" for c in spread)
             + f" {counts[0]:>5} {counts[1]:>5} {counts[2]:>6} {counts[3]:>4}")
    if args.reform:
        cells += f" {sum(r['reformed'] is not None for _, r in survivors):>9}"
    return cells + "  " + ", ".join(f"{k} {v}" for k, v in sorted(raised.items()))


def replay_args(args: argparse.Namespace) -> list[str]:
    """The arguments that replay this run, the seed included."""
    argv = ["-n", str(args.ranks), "--trials", str(args.trials), "--seed", str(args.seed),
            "--collectives", str(args.collectives), "--transport", args.transport,
            "--peer-timeout", f"{args.peer_timeout:g}", "--heartbeat", f"{args.heartbeat:g}",
            "--connect-timeout", f"{args.connect_timeout:g}",
            "--startup-window", f"{args.startup_window:g}", "--timeout", f"{args.timeout:g}"]
    if args.cases:
        argv += ["--cases", ",".join(f"{f}:{m}" for f, m in args.cases)]
    return argv + ["--reform"] * args.reform


def command(args: argparse.Namespace, trial: int | None = None) -> str:
    """The command line that replays this run, or one trial of it."""
    one = ["--trial", str(trial)] if trial is not None else []
    return "ringlib bench chaos " + shlex.join(replay_args(args) + one)


def document(args: argparse.Namespace, trials: list[dict[str, Any]],
             found: dict[int, list[str]], seconds: float) -> dict[str, Any]:
    """The run as JSON: its settings, every trial's record and problems."""
    return {"benchmark": "chaos", "command": command(args), "seed": args.seed,
            "ranks": args.ranks, "reform": args.reform,
            "settings": {k: getattr(args, k) for k in (
                "peer_timeout", "heartbeat", "connect_timeout", "startup_window", "timeout",
                "collectives", "transport")},
            "seconds": seconds, "trials": [{**t, "problems": found[t["trial"]]} for t in trials],
            "table": table(args, trials)}


def chaos(args: argparse.Namespace) -> int:
    """Run the trials, print one line each and the table; 1 if any trial had a problem."""
    numbers = [args.trial] if args.trial else list(range(1, args.trials + 1))
    print(f"chaos: {len(numbers)} trial(s) of {args.ranks} ranks, seed {args.seed}, "
          f"peer timeout {args.peer_timeout:g} s, heartbeat {args.heartbeat:g} s, "
          f"connect timeout {args.connect_timeout:g} s" + ", re-forming" * args.reform,
          flush=True)
    trials, found, began = [], {}, time.monotonic()
    for k in numbers:
        trial = run_trial(args, plan_trial(args, k))
        trials.append(trial)
        found[k] = problems(args, trial)
        print(_progress(trial, found[k]), flush=True)
        for why in found[k]:
            print(f"    {why}\n    replay: {command(args, k)}", flush=True)
    seconds = time.monotonic() - began
    print(table(args, trials), flush=True)
    print("detection: the first exception's time on each survivor less the fault's; "
          "unrep.: survivors that did not report the loss; left: processes, /dev/shm "
          "names and files left behind", flush=True)
    print(_exit_summary(trials), flush=True)
    print(f"{len(trials)} trials in {seconds:.0f} s; command: {command(args)}", flush=True)
    if args.json:
        write_json(args.json, document(args, trials, found, seconds))
    failed = [k for k, why in found.items() if why]
    if failed:
        print(f"chaos failed, seed {args.seed}: trials {failed} had problems", file=sys.stderr)
    return 1 if failed else 0


def _exit_summary(trials: list[dict[str, Any]]) -> str:
    """How long the survivors took from their first exception to their exit."""
    gaps = sorted(r["exited_s"] - (r["detection_s"] + t["fault_s"]) for t in trials
                  for r in t["ranks"] if not r["victim"] and r["exited_s"] is not None
                  and r["detection_s"] is not None)
    if not gaps:
        return "no survivor exited on its own"
    return (f"survivors exited {gaps[0]:.2f}-{gaps[-1]:.2f} s after raising "
            f"(p50 {percentile(gaps, 50):.2f} s)")


def _progress(trial: dict[str, Any], found: list[str]) -> str:
    times = [r["detection_s"] for r in trial["ranks"]
             if not r["victim"] and r["detection_s"] is not None]
    spread = f"{min(times):.2f}-{max(times):.2f} s" if times else "-"
    return (f"trial {trial['trial']:>3}: {trial['description']} (hit: {trial['moment']}): "
            f"detected in {spread}, {trial['seconds']:.1f} s; "
            + ("ok" if not found else f"{len(found)} problem(s)"))


def _case(text: str) -> tuple[str, str]:
    fault, _, moment = text.partition(":")
    if fault not in FAULTS or moment not in MOMENTS:
        raise argparse.ArgumentTypeError(
            f"{text!r}: a case is FAULT:MOMENT, FAULT one of {', '.join(FAULTS)}, "
            f"MOMENT one of {', '.join(MOMENTS)}")
    return fault, moment


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ringlib bench chaos", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-n", "--ranks", type=int, default=4)
    p.add_argument("--trials", type=int, default=20)
    p.add_argument("--seed", type=int, help="replay a run (default: a fresh one, printed)")
    p.add_argument("--trial", type=int, help="run only trial K of the seed's run (1-based)")
    p.add_argument("--reform", action="store_true",
                   help="the survivors re-form and must agree")
    p.add_argument("--collectives", type=int, default=100,
                   help="a fault while running comes after 0 to this many - 1 collectives")
    p.add_argument("--cases", type=lambda text: [_case(c) for c in text.split(",")],
                   help="FAULT:MOMENT,... cycled over the trials instead of drawn, e.g. "
                   "kill:running,stop:running,kill:start-up")
    p.add_argument("--transport", choices=(*TRANSPORTS, "both"), default="both",
                   help="both (default): drawn per trial")
    p.add_argument("--peer-timeout", type=float, default=1.0,
                   help="the ranks' peer_timeout (RINGLIB_PEER_TIMEOUT)")
    p.add_argument("--heartbeat", type=float, default=0.2, help="the ranks' heartbeat_s")
    p.add_argument("--connect-timeout", type=float, default=5.0,
                   help="the ranks' start-up timeout, and each re-forming round's")
    p.add_argument("--startup-window", type=float, default=2.5,
                   help="a start-up fault comes 0 to this many seconds after the victim started")
    p.add_argument("--timeout", type=float, default=60.0,
                   help="every trial ends by then: whatever still runs is hung and killed")
    p.add_argument("--json", type=Path, help="write every trial's figures there")
    return p


def _validate(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.ranks < 2:
        p.error("-n must be at least 2: a ring of one has nobody to lose")
    if min(args.trials, args.collectives) < 1 or (args.trial is not None and args.trial < 1):
        p.error("--trials, --collectives and --trial must be at least 1")
    if not 0 < args.heartbeat < args.peer_timeout:
        p.error("--heartbeat must be above 0 and below --peer-timeout")
    if min(args.connect_timeout, args.startup_window, args.timeout) <= 0:
        p.error("--connect-timeout, --startup-window and --timeout must be above 0")
    if args.json and not args.json.parent.is_dir():
        p.error(f"--json: no directory {args.json.parent}")


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    _validate(p, args)
    if args.seed is None:
        args.seed = int(np.random.SeedSequence().entropy % 2**32)
    try:
        return chaos(args)
    except KeyboardInterrupt:
        sys.exit(f"chaos interrupted, seed {args.seed}; every rank was stopped")


if __name__ == "__main__":
    sys.exit(main())
