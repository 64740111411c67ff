"""All-reduce latency and bandwidth of a ring of real processes on this host, nccl-tests style.

    python -m ringlib.bench.allreduce [-n 2] [--transport tcp|ipc] [--sizes 8B:64MiB:4]
        [--dtype float32] [--op sum] [--iters N] [--segment 1MiB[,4MiB...]] [--crossover]

The parent starts -n ranks (this module with --worker, wired by RINGLIB_* variables on
free 127.0.0.1 ports or ipc paths in a private temporary directory), reads rank 0's
results as JSON lines and prints the table. For each size every rank checks one
all_reduce of rank+1 values, warms up, agrees with rank 0 on an iteration count (from the
warm-up, unless --iters), meets at one barrier, then runs the timed all_reduces back to
back, with no barrier between them; rank 0 times each call with perf_counter and reports
the median and p99.

--crossover times recursive doubling (small_bytes set huge) against the ring
(small_bytes 0) at 256 B..1 MiB, taking turns a few calls at a time: where SMALL_BYTES
should sit. Several --segment sizes likewise take turns, one column each.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import shlex
import sys
import time
from dataclasses import dataclass
from typing import Any, TextIO

import numpy as np

import ringlib
from ringlib.dtypes import BY_NAME

from .ranks import WorkerFailed, exit_with_parent, run_ranks
from .timing import format_size, parse_size_list, parse_sizes

DEFAULT_SIZES = "8B:64MiB:4"
CROSSOVER_SIZES = "256B:1MiB:2"
ALWAYS = 1 << 62           # a small_bytes no buffer reaches: recursive doubling for all
BUDGET_S = 2.5             # timed seconds per size (all variants together) when adaptive
MIN_ITERS, MAX_ITERS = 5, 2000
TURN_CALLS = 4             # calls timed together per variant when variants alternate
CONNECT_TIMEOUT = 30.0
COLLECTIVE_TIMEOUT = 60.0  # a lost rank fails the run in a minute, not the ring's 5


# --- what is measured ----------------------------------------------------------------

@dataclass(frozen=True)
class Variant:
    """Ring settings that one column of timings runs under; None leaves the ring's own."""

    label: str
    small_bytes: int | None = None
    segment_bytes: int | None = None

    def apply(self, ring: ringlib.Ring) -> None:
        """Set this variant on `ring`; every rank does so before the same call."""
        if self.small_bytes is not None:
            ring.small_bytes = self.small_bytes
        if self.segment_bytes is not None:
            ring.segment_bytes = self.segment_bytes


def variants_for(crossover: bool, segments: list[int] | None) -> list[Variant]:
    """The settings timed side by side: doubling vs ring, several segment sizes, or one."""
    segment = segments[0] if segments and len(segments) == 1 else None
    if crossover:
        return [Variant("doubling", ALWAYS, segment), Variant("ring", 0, segment)]
    if segments and len(segments) > 1:
        return [Variant(f"seg {format_size(s)}", segment_bytes=s) for s in segments]
    return [Variant("", segment_bytes=segment)]


# --- one rank (--worker) -------------------------------------------------------------

def _buffer(dtype: str, count: int) -> Any:
    if dtype == "bfloat16":  # numpy has no bfloat16
        import torch

        return torch.zeros(count, dtype=torch.bfloat16)
    return np.zeros(count, dtype)


async def _check(ring: ringlib.Ring, x: Any, dtype: str, op: str, variant: Variant) -> None:
    """One all_reduce of rank+1 everywhere must give the op over 1..N, rounded to the dtype."""
    variant.apply(ring)
    x[...] = ring.rank + 1
    await ring.all_reduce(x, op)
    values = np.arange(1, ring.world_size + 1, dtype=np.float64)
    expected = _buffer(dtype, 1)
    expected[...] = float(getattr(np, op)(values))
    wrong = int((x != expected[0]).sum())
    if wrong:
        raise AssertionError(f"rank {ring.rank}: {variant.label or 'all_reduce'} {op} of "
                             f"{len(x)} elements: {wrong} differ from {float(expected[0])}")


async def _round(ring: ringlib.Ring, x: Any, op: str, variants: list[Variant],
                 samples: list[list[float]]) -> None:
    """One sample per variant (seconds per call), appended to that variant's samples.

    With one variant a sample is one call. Back to back, the ranks take turns finishing
    first, so rank 0's calls alternate short and long and only runs of them add up to the
    true period; a call right after a switch of variant also waits out the previous
    variant's tail on the other ranks. So with several variants each turn is one untimed
    call, then TURN_CALLS calls timed together.
    """
    calls = TURN_CALLS if len(variants) > 1 else 1
    for variant, times in zip(variants, samples):
        variant.apply(ring)
        if calls > 1:
            await ring.all_reduce(x, op)
        start = time.perf_counter()
        for _ in range(calls):
            await ring.all_reduce(x, op)
        times.append((time.perf_counter() - start) / calls)


async def _agree_on_iterations(ring: ringlib.Ring, warmup: list[list[float]]) -> int:
    """Rank 0 sizes the timed loop from its slowest warm-up round and tells the others."""
    calls = 1 if len(warmup) == 1 else TURN_CALLS + 1  # per sample, the untimed one too
    per_round = calls * float(np.max(np.sum(warmup, axis=0))) if warmup[0] else 1e-3
    box = np.array([max(MIN_ITERS, min(MAX_ITERS, int(BUDGET_S / max(per_round, 1e-7))))])
    await ring.broadcast(box, root=0)
    return int(box[0])


async def measure(ring: ringlib.Ring, nbytes: int, args: argparse.Namespace,
                  variants: list[Variant]) -> dict[str, Any]:
    """Check, warm up and time all_reduce of `nbytes` under every variant, interleaved."""
    x = _buffer(args.dtype, nbytes // BY_NAME[args.dtype].itemsize)
    for variant in variants:
        await _check(ring, x, args.dtype, args.op, variant)
    x[...] = 0  # zeros stay zeros under every op: no overflow, no denormals
    warmup: list[list[float]] = [[] for _ in variants]
    for _ in range(args.warmup):
        await _round(ring, x, args.op, variants, warmup)
    iters = args.iters or await _agree_on_iterations(ring, warmup)
    algos = [_algorithm(ring, v, nbytes) for v in variants]
    samples: list[list[float]] = [[] for _ in variants]
    await ring.barrier()
    gc.collect()
    gc.disable()
    try:
        for _ in range(iters):
            await _round(ring, x, args.op, variants, samples)
    finally:
        gc.enable()
    return {"kind": "row", "bytes": nbytes, "count": len(x), "iters": iters, "algo": algos,
            "p50": [float(np.median(s)) for s in samples],
            "p99": [float(np.percentile(s, 99)) for s in samples]}


def _algorithm(ring: ringlib.Ring, variant: Variant, nbytes: int) -> str:
    variant.apply(ring)
    return "doubling" if nbytes <= ring.small_bytes else "ring"


async def run_worker(args: argparse.Namespace) -> None:
    """This rank's part: join the ring from RINGLIB_*; rank 0 prints one JSON line a size."""
    variants = variants_for(args.crossover, args.segment)
    async with ringlib.connect(timeout=CONNECT_TIMEOUT,
                               collective_timeout=COLLECTIVE_TIMEOUT) as ring:
        say = print if ring.rank == 0 else (lambda *_, **__: None)
        say(json.dumps({"kind": "setup", "small_bytes": ring.small_bytes,
                        "segment_bytes": ring.segment_bytes}), flush=True)
        for nbytes in args.sizes:
            say(json.dumps(await measure(ring, nbytes, args, variants)), flush=True)


# --- the tables ----------------------------------------------------------------------

@dataclass
class Row:
    nbytes: int
    count: int
    iters: int
    algo: list[str]
    p50: list[float]  # seconds, one per variant
    p99: list[float]


def nccl_header() -> str:
    head = (f"{'size':>9} {'count':>10} {'type':>8} {'iters':>6} {'p50 us':>10} "
            f"{'p99 us':>10} {'algbw GB/s':>10} {'busbw GB/s':>10}  algo")
    return f"{head}\n{'-' * len(head)}"


def nccl_row(row: Row, dtype: str, world: int) -> str:
    """One size: algbw = bytes / p50 time, busbw = algbw * 2(n-1)/n (nccl-tests)."""
    algbw = row.nbytes / row.p50[0] / 1e9
    busbw = algbw * 2 * (world - 1) / world
    return (f"{format_size(row.nbytes):>9} {row.count:>10} {dtype:>8} {row.iters:>6} "
            f"{row.p50[0] * 1e6:>10.1f} {row.p99[0] * 1e6:>10.1f} {algbw:>10.3f} "
            f"{busbw:>10.3f}  {row.algo[0]}")


def _comparison_columns(labels: list[str]) -> list[str]:
    return ([f"{label} p50 us" for label in labels]
            + [f"{label}/{labels[0]}" for label in labels[1:]])


def comparison_header(labels: list[str]) -> str:
    cols = "  ".join(f"{c:>{max(len(c), 10)}}" for c in _comparison_columns(labels))
    head = f"{'size':>9} {'iters':>6} {cols}  fastest"
    return f"{head}\n{'-' * len(head)}"


def comparison_row(row: Row, labels: list[str]) -> str:
    """p50 of every variant, each later one's ratio to the first, and the fastest label."""
    values = [f"{t * 1e6:.1f}" for t in row.p50] + [f"{t / row.p50[0]:.2f}" for t in row.p50[1:]]
    widths = [max(len(c), 10) for c in _comparison_columns(labels)]
    cols = "  ".join(f"{v:>{w}}" for v, w in zip(values, widths))
    fastest = labels[int(np.argmin(row.p50))]
    return f"{format_size(row.nbytes):>9} {row.iters:>6} {cols}  {fastest}"


def crossover_summary(rows: list[Row]) -> str:
    """Where the ring (variant 1) first beats doubling (variant 0), and where else it does."""
    wins = [format_size(r.nbytes) for r in rows if r.p50[1] < r.p50[0]]
    if not wins:
        return "the ring never beat recursive doubling at these sizes"
    return f"the ring first beats recursive doubling at {wins[0]} (it wins at {', '.join(wins)})"


class Report:
    """Prints the table as rank 0's lines arrive, and its footer at the end."""

    def __init__(self, args: argparse.Namespace, argv: list[str],
                 labels: list[str], out: TextIO = sys.stdout) -> None:
        self.args, self.argv, self.labels, self.out = args, argv, labels, out
        self.rows: list[Row] = []
        self.setup: dict[str, Any] = {}

    def __call__(self, message: dict[str, Any]) -> None:
        if message["kind"] == "setup":
            self.setup = message
            header = nccl_header() if len(self.labels) == 1 else comparison_header(self.labels)
            print(header, file=self.out, flush=True)
            return
        row = Row(message["bytes"], message["count"], message["iters"], message["algo"],
                  message["p50"], message["p99"])
        self.rows.append(row)
        line = (nccl_row(row, self.args.dtype, self.args.ranks) if len(self.labels) == 1
                else comparison_row(row, self.labels))
        print(line, file=self.out, flush=True)

    def footer(self) -> str:
        a, s = self.args, self.setup
        small = "per column" if a.crossover else format_size(s["small_bytes"])
        segment = ("per column" if a.segment and len(a.segment) > 1
                   else format_size(a.segment[0] if a.segment else s["segment_bytes"]))
        lines = [f"all_reduce {a.op}, {a.ranks} ranks on {a.transport} (this host); "
                 f"small_bytes {small}, segment_bytes {segment}"]
        if len(self.labels) == 1:
            lines.append("p50/p99: rank 0's per-call times; algbw = size / p50; "
                         f"busbw = algbw * 2(n-1)/n = algbw * {2 * (a.ranks - 1) / a.ranks:.2f} "
                         "(nccl-tests' definitions)")
        else:
            lines.append(f"columns take turns, each turn 1 untimed + {TURN_CALLS} timed calls; "
                         f"p50 of per-call means; ratio = column p50 / {self.labels[0]} p50 "
                         f"(<1: faster than {self.labels[0]})")
        if a.crossover and self.rows:
            lines.append(crossover_summary(self.rows))
        lines.append("command: ringlib bench allreduce " + shlex.join(self.argv))
        return "\n".join(lines)


# --- command line --------------------------------------------------------------------

def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ringlib bench allreduce", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-n", "--ranks", type=int, default=2, help="processes (default: 2)")
    p.add_argument("--transport", choices=("tcp", "ipc"), default="tcp")
    p.add_argument("--sizes", type=parse_sizes, default=None,
                   help=f"START:STOP[:FACTOR] or a comma list (default: {DEFAULT_SIZES}; "
                        f"{CROSSOVER_SIZES} with --crossover)")
    p.add_argument("--dtype", choices=list(BY_NAME), default="float32")
    p.add_argument("--op", choices=[o.value for o in ringlib.Op], default="sum")
    p.add_argument("--iters", type=int, default=None,
                   help=f"samples per size: one call each, or {TURN_CALLS} per variant when "
                        f"variants alternate (default: ~{BUDGET_S:g} s worth, "
                        f"{MIN_ITERS}..{MAX_ITERS})")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds per size (default: 2)")
    p.add_argument("--segment", type=parse_size_list, default=None,
                   help="the ring's segment_bytes; several: timed side by side")
    p.add_argument("--crossover", action="store_true",
                   help="time recursive doubling against the ring, side by side")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    return p


def _validate(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.sizes is None:
        args.sizes = parse_sizes(CROSSOVER_SIZES if args.crossover else DEFAULT_SIZES)
    itemsize = BY_NAME[args.dtype].itemsize
    bad = [s for s in args.sizes if s < itemsize or s % itemsize]
    if bad:
        p.error(f"sizes {bad} are not whole multiples of {args.dtype}'s {itemsize} bytes")
    if args.ranks < 2:
        p.error("-n must be at least 2: a ring of one sends nothing")
    if args.crossover and args.segment and len(args.segment) > 1:
        p.error("--crossover takes at most one --segment")
    if (args.iters is not None and args.iters < 1) or args.warmup < 0:
        p.error("--iters must be at least 1 and --warmup at least 0")


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = parser()
    args = p.parse_args(argv)
    _validate(p, args)
    if args.worker:
        exit_with_parent()
        asyncio.run(run_worker(args))
        return
    report = Report(args, argv, [v.label for v in variants_for(args.crossover, args.segment)])
    try:
        run_ranks(__spec__.name, argv, args.ranks, args.transport, report)
    except WorkerFailed as exc:
        sys.exit(f"allreduce benchmark failed: {exc}")
    except KeyboardInterrupt:
        sys.exit("allreduce benchmark interrupted; every rank was stopped")
    print(report.footer())


if __name__ == "__main__":
    main()
