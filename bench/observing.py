"""What observing a ring costs: the flight recorder and the timeline, side by side in one
run, against a ring that records nothing.

    ringlib bench observing [-n 2] [--sizes 8B,4KiB] [--calls 3000] [--json out.json]

The ranks (`ringlib launch`) time all-reduces in blocks of BLOCK calls, the variants
taking turns block by block on the same ring, so that the machine's drift falls on all
alike: "bare" (flight recorder off, no timeline), "recorder" (the default: the flight
recorder keeps its last 256 collectives, no timeline) and "timeline" (both, the
timeline written to a private temporary directory). They do it through the blocking API
a training loop calls, then through the asyncio one. Rank 0 prints its medians per call;
this process prints them with each variant's ratio to "bare".
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

import numpy as np

from .results import write_json
from .timing import format_size, parse_sizes

BLOCK = 100
KEPT = 256  # the flight recorder's default
VARIANTS = ("bare", "recorder", "timeline")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ringlib bench observing", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-n", "--ranks", type=int, default=2)
    p.add_argument("--sizes", type=parse_sizes, default=parse_sizes("8B,4KiB"),
                   help="all-reduce sizes, float32 (default 8B,4KiB)")
    p.add_argument("--calls", type=int, default=3000, help="timed calls per variant and size")
    p.add_argument("--json", type=Path, help="write the figures there")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    return p


def _schedule(args: argparse.Namespace) -> Iterator[tuple[int, str, bool]]:
    """(size, variant, timed) for each block: per size, a first untimed round of every
    variant, then the variants taking turns."""
    for size in args.sizes:
        for block in range(len(VARIANTS) * (1 + max(1, args.calls // BLOCK))):
            yield size, VARIANTS[block % len(VARIANTS)], block >= len(VARIANTS)


def _medians(times: dict[tuple[int, str], list[float]]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for (size, variant), t in times.items():
        out.setdefault(format_size(size), {})[variant] = float(np.median(t) * 1e6)
    return out


def _blocking(args: argparse.Namespace, directory: str) -> tuple[int, dict]:
    import ringlib
    ring = ringlib.init()
    times: dict[tuple[int, str], list[float]] = collections.defaultdict(list)
    for size, variant, timed in _schedule(args):
        ring.stop_timeline()
        if variant == "timeline":
            ring.start_timeline(directory)
        ring.flight.keep(0 if variant == "bare" else KEPT)
        x, own = np.ones(size // 4, np.float32), times[size, variant]
        for _ in range(BLOCK):
            start = time.perf_counter()
            ring.all_reduce(x)
            if timed:
                own.append(time.perf_counter() - start)
    ring.stop_timeline()
    rank = ring.rank
    ring.close()
    return rank, _medians(times)


async def _asyncio(args: argparse.Namespace, directory: str) -> dict:
    import ringlib
    times: dict[tuple[int, str], list[float]] = collections.defaultdict(list)
    async with ringlib.connect() as ring:
        for size, variant, timed in _schedule(args):
            ring.stop_timeline()
            if variant == "timeline":
                await ring.start_timeline(directory)
            ring.flight.keep(0 if variant == "bare" else KEPT)
            x, own = np.ones(size // 4, np.float32), times[size, variant]
            for _ in range(BLOCK):
                start = time.perf_counter()
                await ring.all_reduce(x)
                if timed:
                    own.append(time.perf_counter() - start)
        ring.stop_timeline()
    return _medians(times)


def worker(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="ringlib-observing-") as directory:
        rank, blocking = _blocking(args, directory)
        on_asyncio = asyncio.run(_asyncio(args, directory))
    if rank == 0:
        print(json.dumps({"blocking": blocking, "asyncio": on_asyncio}), flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    if args.ranks < 2 or args.calls < BLOCK:
        parser().error(f"-n must be 2 or more and --calls {BLOCK} or more")
    sizes = ",".join(format_size(s).replace(" ", "") for s in args.sizes)
    run = subprocess.run([sys.executable, "-m", "ringlib", "launch", "-n", str(args.ranks),
                          "--", sys.executable, "-m", "ringlib.bench.observing", "--worker",
                          "--sizes", sizes, "--calls", str(args.calls)],
                         stdout=subprocess.PIPE, text=True)
    if run.returncode:
        print(f"the ranks failed (exit {run.returncode})", file=sys.stderr)
        return 1
    results = json.loads(run.stdout.strip().splitlines()[-1].split("] ", 1)[-1])
    print(f"{args.ranks} ranks, all_reduce float32 sum, rank 0's medians per call (µs), "
          "variants taking turns in blocks of 100 calls on one ring")
    print(f"{'api':>9} {'size':>7} " + " ".join(f"{v:>9}" for v in VARIANTS) +
          "  recorder/bare  timeline/bare")
    for api, by_size in results.items():
        for size, m in by_size.items():
            print(f"{api:>9} {size:>7} " + " ".join(f"{m[v]:9.1f}" for v in VARIANTS) +
                  f"  {m['recorder'] / m['bare']:13.3f}  {m['timeline'] / m['bare']:13.3f}")
    print(f"command: ringlib bench observing -n {args.ranks} --sizes {sizes} "
          f"--calls {args.calls}")
    if args.json:
        write_json(args.json, {"benchmark": "observing", "ranks": args.ranks,
                               "calls": args.calls, "medians_us": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
