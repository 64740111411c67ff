"""Soak: thousands of random collectives across real processes on this host, every result
checked, and each rank's peak resident growth bounded.

    ringlib bench soak [-n 3] [--collectives 10000] [--seed S] [--max-bytes 256KiB]
        [--warmup 300] [--in-flight 1] [--transport tcp|ipc] [--max-growth-mb 20]
        [--json out.json]

Each collective is drawn from the seed (printed first, and again in any failure): one of
all_reduce, reduce_scatter, all_gather and broadcast, a dtype, an op valid for it (no
integer mean), a root for broadcast, and a size from 0 elements to --max-bytes, most of
them small; with --in-flight K, groups of 1 to K of them (drawn too) run at once. Every
rank checks every result against the float64 reference it computes from every rank's
input (see soak_rank.py), and all ranks must end with the same digest of the results
they share. Each rank's peak resident size is measured from the end of the warm-up to
the end of the run. The run fails (exit 1) on a wrong result, ranks that disagree, a rank
that fails, or a growth of --max-growth-mb or more on any rank. That bound fits the
default sizes: the soak's own inputs take world size x --max-bytes per collective.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import sys
from pathlib import Path
from typing import Any

import numpy as np

from .ranks import WorkerFailed, exit_with_parent, run_ranks
from .results import write_json
from .soak_rank import run_worker, soak_dtypes
from .timing import format_size, parse_size

MB = 1e6
TUNING = ("RINGLIB_SEGMENT_BYTES", "RINGLIB_SMALL_BYTES", "RINGLIB_SPIN_US", "RINGLIB_DIRECT_BYTES")


def parser() -> argparse.ArgumentParser:
    """The command line, shared by the parent and its ranks (--worker)."""
    p = argparse.ArgumentParser(prog="ringlib bench soak", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-n", "--ranks", type=int, default=3)
    p.add_argument("--collectives", type=int, default=10_000)
    p.add_argument("--seed", type=int, help="replay a run (default: a fresh one, printed)")
    p.add_argument("--max-bytes", type=parse_size, default=256 << 10,
                   help="the largest buffer, e.g. 256KiB (default)")
    p.add_argument("--warmup", type=int, default=300,
                   help="collectives run (and checked) before memory is measured")
    p.add_argument("--in-flight", type=int, default=1,
                   help="run groups of 1 to this many collectives at once (drawn from the seed)")
    p.add_argument("--transport", choices=("tcp", "ipc"), default="tcp")
    p.add_argument("--max-growth-mb", type=float, default=20.0,
                   help="fail if a rank's peak resident size grows by this much or more")
    p.add_argument("--json", type=Path, help="write the figures there")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    return p


def _validate(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.ranks < 2:
        p.error("-n must be at least 2: a ring of one sends nothing")
    if min(args.collectives, args.max_bytes, args.in_flight) < 1 or args.warmup < 0:
        p.error("--collectives, --max-bytes and --in-flight must be at least 1, "
                "--warmup at least 0")
    if args.json and not args.json.parent.is_dir():
        p.error(f"--json: no directory {args.json.parent}")


def replay_args(args: argparse.Namespace) -> list[str]:
    """The arguments that replay this run, the seed included; the ranks get them too."""
    return ["-n", str(args.ranks), "--collectives", str(args.collectives),
            "--seed", str(args.seed), "--max-bytes", str(args.max_bytes),
            "--warmup", str(args.warmup), "--in-flight", str(args.in_flight),
            "--transport", args.transport]


def command(args: argparse.Namespace) -> str:
    """The command line that replays this run, with the ring settings the ranks take
    from this environment."""
    settings = [f"{name}={os.environ[name]}" for name in TUNING if name in os.environ]
    return shlex.join([*settings, "python", "-m", "ringlib.bench.soak", *replay_args(args)])


class Progress:
    """Prints rank 0's progress lines and keeps its last line, the result."""

    def __init__(self) -> None:
        self.result: dict[str, Any] | None = None

    def __call__(self, line: dict[str, Any]) -> None:
        if line["kind"] == "result":
            self.result = line
            return
        print(f"  {line['done']:>7} done in {line['seconds']:6.1f} s", flush=True)


def summary(args: argparse.Namespace, result: dict[str, Any]) -> str:
    """What the run did, how fast, and how much each rank grew."""
    ranks = result["ranks"]
    checked = sum(r["checked"] for r in ranks)
    growth = ", ".join(f"rank {i} {r['growth_bytes'] / MB:.1f} MB" for i, r in enumerate(ranks))
    return "\n".join([
        f"{args.collectives} collectives in {result['seconds']:.1f} s: "
        f"{args.collectives / result['seconds']:.0f} collectives/s, inputs and checks "
        f"included ({result['in_ring_seconds']:.1f} s of it in ringlib's calls on rank 0)",
        f"checked {checked} results ({', '.join(str(r['checked']) for r in ranks)} per rank); "
        f"digests {', '.join(r['digest'] for r in ranks)}",
        f"peak RSS growth after {min(args.warmup, args.collectives)} warm-up collectives: "
        f"{growth} (bound {args.max_growth_mb:g} MB)",
        f"command: {command(args)}",
    ])


def problems(args: argparse.Namespace, result: dict[str, Any]) -> list[str]:
    """Everything wrong with a finished run; empty when it passed."""
    ranks, found = result["ranks"], []
    unchecked = [i for i, r in enumerate(ranks) if r["checked"] != args.collectives]
    if unchecked:
        found.append(f"ranks {unchecked} did not check all {args.collectives} results")
    if len({r["digest"] for r in ranks}) > 1:
        found.append("ranks ended with different results (digests differ)")
    grown = [i for i, r in enumerate(ranks) if r["growth_bytes"] >= args.max_growth_mb * MB]
    if grown:
        found.append(f"ranks {grown} grew by {args.max_growth_mb:g} MB or more")
    return found


def document(args: argparse.Namespace, result: dict[str, Any], found: list[str]) -> dict[str, Any]:
    """The run as JSON."""
    return {"benchmark": "soak", "command": command(args), "seed": args.seed,
            "ranks": args.ranks, "collectives": args.collectives, "max_bytes": args.max_bytes,
            "warmup": args.warmup, "in_flight": args.in_flight, "transport": args.transport,
            "dtypes": result["dtypes"],
            "seconds": result["seconds"], "in_ring_seconds": result["in_ring_seconds"],
            "collectives_per_s": args.collectives / result["seconds"],
            "per_rank": result["ranks"], "max_growth_mb": args.max_growth_mb,
            "problems": found}


def soak(args: argparse.Namespace) -> None:
    """Run the ranks, print the summary, exit non-zero if anything went wrong."""
    print(f"soak: {args.collectives} collectives on {args.ranks} ranks over {args.transport}, "
          f"seed {args.seed}, up to {format_size(args.max_bytes)} and {args.in_flight} "
          f"at once, dtypes {', '.join(soak_dtypes())}", flush=True)
    progress = Progress()
    try:
        run_ranks(__spec__.name, replay_args(args), args.ranks, args.transport, progress)
    except WorkerFailed as exc:
        sys.exit(f"soak failed, seed {args.seed} (replay: {command(args)}):\n{exc}")
    except KeyboardInterrupt:
        sys.exit(f"soak interrupted, seed {args.seed}; every rank was stopped")
    found = problems(args, progress.result)
    print(summary(args, progress.result), flush=True)
    if args.json:
        write_json(args.json, document(args, progress.result, found))
    if found:
        sys.exit(f"soak failed, seed {args.seed} (replay: {command(args)}): " + "; ".join(found))


def main(argv: list[str] | None = None) -> None:
    p = parser()
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    _validate(p, args)
    if args.worker:
        exit_with_parent()
        asyncio.run(run_worker(args))
        return
    if args.seed is None:
        args.seed = int(np.random.SeedSequence().entropy % 2**32)
    soak(args)


if __name__ == "__main__":
    main()
