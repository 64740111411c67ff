"""All-reduce latency and bandwidth of a ring of real processes on this host, nccl-tests style.

    python -m ringlib.bench.allreduce [-n 2] [--transport tcp|ipc] [--sizes 8B:64MiB:4]
        [--dtype float32] [--op sum] [--iters N] [--segment 1MiB[,4MiB...]] [--crossover]

The parent starts -n ranks (this module with --worker, wired by RINGLIB_* variables on
free 127.0.0.1 ports or ipc paths in a private temporary directory), reads rank 0's
results as JSON lines and prints the table. For each size every rank checks one
all_reduce of rank+1 values, warms up, agrees with rank 0 on an iteration count (from the
warm-up, unless --iters), meets at one barrier, then runs the timed all_reduces back to
back; rank 0 times each with perf_counter and reports the median and p99.

--crossover times recursive doubling (small_bytes set huge) against the ring
(small_bytes 0) at 256 B..1 MiB, alternating call by call: where SMALL_BYTES should sit.
Several --segment sizes are likewise timed alternately, one column each.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import queue
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, TextIO

import numpy as np

import ringlib
from ringlib.dtypes import BY_NAME

from .timing import format_size, parse_size

DEFAULT_SIZES = "8B:64MiB:4"
CROSSOVER_SIZES = "256B:1MiB:2"
ALWAYS = 1 << 62           # a small_bytes no buffer reaches: recursive doubling for all
BUDGET_S = 1.5             # timed seconds per size (all variants together) when adaptive
MIN_ITERS, MAX_ITERS = 5, 2000
CONNECT_TIMEOUT = 30.0
COLLECTIVE_TIMEOUT = 60.0  # a lost rank fails the run in a minute, not the ring's 5
GRACE_S = 30.0             # how long the other ranks may take to exit after rank 0
# Placement variables of ringlib and the launchers it understands: the parent sets its own.
PLACEMENT_VARS = ("RINGLIB_RANK", "RINGLIB_WORLD_SIZE", "RINGLIB_PEERS", "RINGLIB_SEED",
                  "RINGLIB_LOCAL_RANK", "RINGLIB_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")
LAUNCHER_PREFIXES = ("OMPI_", "SLURM_", "MASTER_", "PMIX_")


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


def parse_sizes(text: str) -> list[int]:
    """'8B:64MiB:4' (8 B, then 4x each time, and 64 MiB last even if the factor misses it;
    the factor defaults to 2) or a comma list '8B,1MiB'."""
    try:
        if ":" not in text:
            return [parse_size(s) for s in text.split(",")]
        start, stop, *factor = text.split(":")
        low, high, step = parse_size(start), parse_size(stop), int(factor[0]) if factor else 2
    except (ValueError, IndexError):
        raise argparse.ArgumentTypeError(f"bad sizes {text!r}") from None
    if low < 1 or high < low or step < 2 or len(factor) > 1:
        raise argparse.ArgumentTypeError(f"{text!r}: want START:STOP[:FACTOR], "
                                         "1 <= START <= STOP, FACTOR >= 2")
    sizes = [low]
    while sizes[-1] * step <= high:
        sizes.append(sizes[-1] * step)
    return sizes if sizes[-1] == high else [*sizes, high]


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
    """One timed all_reduce per variant, appended to that variant's samples (seconds)."""
    for variant, times in zip(variants, samples):
        variant.apply(ring)
        start = time.perf_counter()
        await ring.all_reduce(x, op)
        times.append(time.perf_counter() - start)


async def _agree_on_iterations(ring: ringlib.Ring, warmup: list[list[float]]) -> int:
    """Rank 0 sizes the timed loop from its slowest warm-up round and tells the others."""
    per_round = float(np.max(np.sum(warmup, axis=0))) if warmup[0] else 1e-3
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


def _exit_with_parent() -> None:
    """Exit at once when stdin (the parent's pipe) closes: a parent killed outright
    leaves no rank behind."""
    def watch() -> None:
        while os.read(0, 4096):  # raw reads: a buffered stdin would block interpreter exit
            pass
        os._exit(3)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


# --- the parent: start the ranks, stream rank 0's lines, kill everything at the end --

class WorkerFailed(RuntimeError):
    """A rank exited non-zero or hung; the message carries the ends of their stderr."""


def free_ports(count: int) -> list[int]:
    """Ports the kernel just handed out as free (held open together, so all distinct)."""
    with ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(count)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]


def peer_addresses(world: int, transport: str, ipc_dir: str) -> list[str]:
    if transport == "ipc":
        return [f"ipc://{ipc_dir}/r{i}" for i in range(world)]
    return [f"tcp://127.0.0.1:{p}" for p in free_ports(world)]


def _rank_env(rank: int, peers: list[str]) -> dict[str, str]:
    """os.environ without any launcher's placement, plus this rank's RINGLIB_* variables."""
    base = {k: v for k, v in os.environ.items()
            if k not in PLACEMENT_VARS and not k.startswith(LAUNCHER_PREFIXES)}
    return {**base, "RINGLIB_RANK": str(rank), "RINGLIB_WORLD_SIZE": str(len(peers)),
            "RINGLIB_PEERS": ",".join(peers)}


def _start(rank: int, peers: list[str], argv: list[str], log: Path) -> subprocess.Popen:
    with open(log, "w") as err:
        return subprocess.Popen(
            [sys.executable, "-m", "ringlib.bench.allreduce", "--worker", *argv],
            env=_rank_env(rank, peers), stdin=subprocess.PIPE, stderr=err, text=True,
            stdout=subprocess.PIPE if rank == 0 else subprocess.DEVNULL, start_new_session=True)


def run_ranks(args: argparse.Namespace, argv: list[str], on_line: Callable[[dict], None]) -> None:
    """Run the ranks to the end, passing each of rank 0's JSON lines to `on_line`. Every
    process is killed and reaped whatever happens (error, Ctrl-C, SIGTERM)."""
    procs: list[subprocess.Popen] = []
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        with tempfile.TemporaryDirectory(prefix="rl-") as tmp:  # short: ipc paths cap at 107
            logs = [Path(tmp, f"rank{r}.stderr") for r in range(args.ranks)]
            try:
                peers = peer_addresses(args.ranks, args.transport, tmp)
                for rank in range(args.ranks):
                    procs.append(_start(rank, peers, argv, logs[rank]))
                _follow(procs, logs, on_line)
            finally:
                _kill_all(procs)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _follow(procs: list[subprocess.Popen], logs: list[Path],
            on_line: Callable[[dict], None]) -> None:
    """Hand on rank 0's lines until every rank has exited 0; raise WorkerFailed otherwise."""
    lines: queue.Queue[str | None] = queue.Queue()
    threading.Thread(target=_pump, args=(procs[0].stdout, lines), daemon=True).start()
    done_at = None
    while not all(p.poll() == 0 for p in procs) or done_at is None:
        failed = [r for r, p in enumerate(procs) if p.poll() not in (None, 0)]
        if failed or (done_at is not None and time.monotonic() > done_at + GRACE_S):
            raise WorkerFailed(_failure_report(procs, logs, failed))
        try:
            line = lines.get(timeout=0.05)
        except queue.Empty:
            continue
        if line is None:
            done_at = time.monotonic()
        elif line.startswith("{"):
            on_line(json.loads(line))
        else:
            sys.stderr.write(line)


def _pump(stream: TextIO, lines: queue.Queue) -> None:
    with stream:
        for line in stream:
            lines.put(line)
    lines.put(None)


def _failure_report(procs: list[subprocess.Popen], logs: list[Path], failed: list[int]) -> str:
    ranks = failed or [r for r, p in enumerate(procs) if p.poll() is None]
    what = "exited non-zero" if failed else f"still running {GRACE_S:g} s after rank 0 ended"
    parts = [f"rank {', '.join(map(str, ranks))} {what}"]
    for r in ranks:
        tail = logs[r].read_text(errors="replace")[-3000:] if logs[r].exists() else ""
        parts.append(f"--- rank {r} (exit {procs[r].poll()}) stderr:\n{tail.rstrip()}")
    return "\n".join(parts)


def _kill_all(procs: list[subprocess.Popen]) -> None:
    """SIGKILL each rank's whole session if it still runs, then reap every one."""
    for p in procs:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    for p in procs:
        p.wait()
        p.stdin.close()


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


def comparison_header(labels: list[str]) -> str:
    cols = [f"{label + ' p50 us':>16}" for label in labels]
    cols += [f"{f'{label}/{labels[0]}':>14}" for label in labels[1:]]
    head = f"{'size':>9} {'iters':>6} " + " ".join(cols) + "  fastest"
    return f"{head}\n{'-' * len(head)}"


def comparison_row(row: Row, labels: list[str]) -> str:
    """p50 of every variant, each later one's ratio to the first, and the fastest label."""
    cols = [f"{t * 1e6:>16.1f}" for t in row.p50]
    cols += [f"{t / row.p50[0]:>14.2f}" for t in row.p50[1:]]
    fastest = labels[int(np.argmin(row.p50))]
    return f"{format_size(row.nbytes):>9} {row.iters:>6} " + " ".join(cols) + f"  {fastest}"


def crossover_summary(rows: list[Row]) -> str:
    """Where the ring (variant 1) first beats doubling (variant 0), and from where it always does."""
    wins = [r.p50[1] < r.p50[0] for r in rows]
    if not any(wins):
        return "the ring never beat recursive doubling at these sizes"
    first = rows[wins.index(True)].nbytes
    from_on = next(rows[i].nbytes for i in range(len(rows)) if all(wins[i:]))  \
        if wins[-1] else None
    tail = (f"; it wins at every size from {format_size(from_on)} on" if from_on
            else "; but not at the largest size measured")
    return f"the ring first beats recursive doubling at {format_size(first)}{tail}"


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
        lines = [f"all_reduce {a.op}, {a.ranks} ranks on {a.transport} (this host); "
                 f"small_bytes {format_size(s['small_bytes'])}, segment "
                 f"{format_size(s['segment_bytes'])} unless a column sets it"]
        if len(self.labels) == 1:
            lines.append("p50/p99: rank 0's per-call times; algbw = size / p50; "
                         f"busbw = algbw * 2(n-1)/n = algbw * {2 * (a.ranks - 1) / a.ranks:.2f} "
                         "(nccl-tests' definitions)")
        else:
            lines.append(f"columns timed alternately call by call; ratio = column p50 / "
                         f"{self.labels[0]} p50 (<1: faster than {self.labels[0]})")
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
                   help=f"timed calls per size (default: ~{BUDGET_S:g} s worth, "
                        f"{MIN_ITERS}..{MAX_ITERS})")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds per size (default: 2)")
    p.add_argument("--segment", type=lambda t: [parse_size(s) for s in t.split(",")],
                   default=None, help="the ring's segment_bytes; several: timed side by side")
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
        _exit_with_parent()
        asyncio.run(run_worker(args))
        return
    report = Report(args, argv, [v.label for v in variants_for(args.crossover, args.segment)])
    try:
        run_ranks(args, argv, report)
    except WorkerFailed as exc:
        sys.exit(f"allreduce benchmark failed: {exc}")
    except KeyboardInterrupt:
        sys.exit("allreduce benchmark interrupted; every rank was stopped")
    print(report.footer())


if __name__ == "__main__":
    main()
