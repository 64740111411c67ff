"""Latency and bandwidth of one collective across processes on this host, with Gloo and
MPI timed side by side in the same run (nccl-tests style).

    ringlib bench allreduce|reduce_scatter|all_gather|broadcast|latency [-n 2] [--sizes 8B:64MiB:4]
        [--dtype float32] [--op sum] [--transport tcp|ipc] [--iters N] [--compare gloo,mpi]
        [--json out.json] [--plot out.png] [--segment 1MiB[,4MiB...]] [--crossover]
        [--api async|blocking|both]

The parent starts -n ranks (this module with --worker, wired by RINGLIB_* variables on
free 127.0.0.1 ports or ipc paths in a private temporary directory; under mpirun when
--compare names mpi, so that the same processes are MPI ranks too), follows rank 0's
JSON lines and prints a row per size. In every rank each system (ringlib, and Gloo
and MPI when compared) is checked once per size against a float64 reference, outside
the timed loop, and its peak memory growth over two calls is taken; then the systems take
turns, size by size (see sweep_rank.py). Times are rank 0's medians per call; for
latency, a ping-pong between ranks 0 and 1, half the round trip (one-way latency, as the
OSU micro-benchmarks report it).

--api says which of ringlib's APIs are timed: the asyncio Ring ("ringlib") and the
blocking facade a training loop calls ("blocking", ringlib.init() on a second ring of the
same ranks), by default both, side by side.

--crossover times recursive doubling (small_bytes huge) against the ring (small_bytes 0);
several --segment sizes take turns likewise, one column each.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shlex
import sys
import tempfile
from pathlib import Path
from typing import Any, TextIO

import ringlib
from ringlib.dtypes import BY_NAME
from ringlib.transport.addresses import free_tcp_ports, local_addresses
from ringlib.transport.security import generate

from .options import names_among
from .ranks import WorkerFailed, exit_with_parent, mpirun_missing, run_ranks
from .results import plot, write_json
from .sweep_rank import SETTINGS, TURN_CALLS, run_worker
from .systems import (BLOCKING_PEERS_VARIABLE, COLLECTIVES, CURVE_KEY_VARIABLE,
                      CURVE_PEERS_VARIABLE, SPLIT, STORE_VARIABLE)
from .table import Row, Table, crossover_summary, ratio_summary, slower_summary
from .timing import format_size, parse_int_list, parse_size_list, parse_sizes

DEFAULT_SIZES = "8B:64MiB:4"
CROSSOVER_SIZES = "256B:1MiB:2"
SYSTEMS = ("gloo", "mpi", "curve")
APIS = {"async": ["async"], "blocking": ["blocking"], "both": ["async", "blocking"]}


class Report:
    """Prints the table as rank 0's lines arrive (with a progress bar on a terminal), and
    its footer, JSON document and plot at the end."""

    def __init__(self, args: argparse.Namespace, argv: list[str], skipped: dict[str, str],
                 out: TextIO = sys.stdout) -> None:
        self.args, self.argv, self.out = args, argv, out
        self.skipped = dict(skipped)
        self.rows: list[Row] = []
        self.setup: dict[str, Any] = {}
        self.table: Table | None = None
        self.bar = _progress(len(args.sizes), args.collective)

    def __call__(self, message: dict[str, Any]) -> None:
        if message["kind"] == "setup":
            self.setup = message
            self.skipped.update(message["skipped"])
            self.table = Table(self.args.collective, self.args.dtype, self.args.ranks,
                               message["labels"])
            self._print(self.table.header())
            return
        row = Row.from_message(message)
        self.skipped.update(row.skipped)
        self.rows.append(row)
        self._print(self.table.line(row))
        if self.bar is not None:
            self.bar.update()

    def _print(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line, file=self.out)
        else:
            print(line, file=self.out, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def what(self) -> str:
        """The collective, with its op where it reduces."""
        a = self.args
        return f"{a.collective} {a.op}" if a.collective in ("allreduce", "reduce_scatter") \
            else a.collective

    def footer(self) -> str:
        a, s = self.args, self.setup
        settings = ["small_bytes " + ("per column" if a.crossover
                                      else format_size(s.get("small_bytes", 0)))]
        for option, (attr, _) in SETTINGS.items():
            given = getattr(a, option) or []
            value = given[0] if given else s.get(attr, 0)
            settings.append(f"{attr} " + ("per column" if len(given) > 1 else
                                          f"{value} us" if attr == "spin_us" else
                                          format_size(value)))
        lines = [f"{self.what()}, {a.ranks} ranks on {a.transport} (this host); "
                 + ", ".join(settings)]
        links = self.setup.get("links")
        if links:
            names = {"shared": "shared memory", "direct": "direct links"}
            lines.append("rank 0's links beside ZeroMQ: " + "; ".join(
                f"{names.get(kind, kind)} to " + (
                    f"rank{'s' * (len(ranks) > 1)} {', '.join(map(str, ranks))}" if ranks
                    else "none")
                for kind, ranks in links.items()))
        if self.table is not None:
            timed = "one-way latency (half a round trip)" if a.collective == "latency" \
                else "per-call times"
            lines.append(f"p50/p99: rank 0's {timed}; algbw = size / p50; busbw = algbw "
                         f"* {self.table.bus_factor:.2f} (nccl-tests' definitions); +mem: peak "
                         f"resident growth over two calls of {self.table.labels[0]}")
            if len(self.table.labels) > 1:
                lines.append(f"systems take turns, each turn 1 untimed + {TURN_CALLS} timed "
                             f"calls; {self.table.labels[0]}/X = {self.table.labels[0]}'s p50 "
                             f"over X's (<1: {self.table.labels[0]} is faster)")
                lines += ratio_summary(self.rows, self.table.labels)
                lines += slower_summary(self.rows, self.table.labels)
        if a.crossover and self.rows:
            lines.append(crossover_summary(self.rows))
        lines += [f"skipped {name}: {why}" for name, why in self.skipped.items()]
        versions = ", ".join(f"{k}: {v}" for k, v in self.setup.get("versions", {}).items())
        if versions:
            lines.append(f"compared with {versions}")
        lines.append(f"command: {self.command()}")
        return "\n".join(lines)

    def command(self) -> str:
        """The command line that reproduces this run."""
        return f"ringlib bench {self.args.collective} " + shlex.join(self.argv)

    def document(self) -> dict[str, Any]:
        """The run as JSON: settings, every system's figures per size, what was skipped."""
        a, table = self.args, self.table
        settings = {k: self.setup.get(k) for k in ("small_bytes", "segment_bytes", "spin_us",
                                                   "direct_bytes")}
        return {"benchmark": a.collective, "command": self.command(), "ranks": a.ranks,
                "transport": a.transport, "dtype": a.dtype, "op": a.op, **settings,
                "skipped": self.skipped, "versions": self.setup.get("versions", {}),
                "rows": [{"bytes": r.nbytes, "count": r.count, "iters": r.iters,
                          "algo": r.algo, "results": [
                              {"system": x.label, "p50_us": x.p50 * 1e6, "p99_us": x.p99 * 1e6,
                               "algbw_gbs": x.algbw(r.nbytes),
                               "busbw_gbs": table.busbw(x, r.nbytes),
                               "peak_growth_bytes": x.peak_bytes} for x in r.results]}
                         for r in self.rows]}

    def save(self) -> None:
        a = self.args
        if a.json:
            write_json(a.json, self.document())
        if a.plot and self.rows:
            series: dict[str, list[tuple[int, float, float]]] = {}
            for r in self.rows:
                for x in r.results:
                    series.setdefault(x.label, []).append(
                        (r.nbytes, self.table.busbw(x, r.nbytes), x.p50))
            plot(a.plot, f"{self.what()}, {a.dtype}, {a.ranks} ranks, {a.transport}", series,
                 "busbw")


def _progress(total: int, what: str) -> Any:
    """A tqdm bar on stderr when it is a terminal (and tqdm is installed), else None."""
    if not sys.stderr.isatty():
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=what, unit="size", leave=False)


# --- command line --------------------------------------------------------------------

def parser(collective: str = "allreduce") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"ringlib bench {collective}", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-n", "--ranks", type=int, default=2, help="processes (default: 2)")
    p.add_argument("--transport", choices=("tcp", "ipc"), default="tcp")
    p.add_argument("--sizes", type=parse_sizes, default=None,
                   help=f"START:STOP[:FACTOR] or a comma list (default: {DEFAULT_SIZES}; "
                        f"{CROSSOVER_SIZES} with --crossover)")
    p.add_argument("--dtype", choices=list(BY_NAME), default="float32")
    p.add_argument("--op", choices=[o.value for o in ringlib.Op], default="sum")
    p.add_argument("--iters", type=int, default=None,
                   help="samples per size (default: about 2.5 s worth, 5..2000)")
    p.add_argument("--warmup", type=int, default=2, help="untimed turns per size (default: 2)")
    p.add_argument("--compare", type=names_among(SYSTEMS, "system"), default=[],
                   help="also time these systems in the same processes: gloo "
                        "(torch.distributed), mpi (mpi4py; the ranks then run under mpirun), "
                        "curve (ringlib with CurveZMQ on every link, a second ring)")
    p.add_argument("--json", type=Path, default=None, help="write the results here as JSON")
    p.add_argument("--plot", type=Path, default=None, help="plot busbw and time here (PNG)")
    p.add_argument("--no-memory", dest="memory", action="store_false",
                   help="skip the peak-memory calls")
    p.add_argument("--segment", type=parse_size_list, default=None,
                   help="ringlib's segment_bytes; several: timed side by side")
    p.add_argument("--spin", type=parse_int_list, default=None,
                   help="ringlib's spin_us; several: timed side by side")
    p.add_argument("--direct", type=parse_size_list, default=None,
                   help="ringlib's direct_bytes (0: off); several: timed side by side")
    p.add_argument("--api", choices=list(APIS), default="both",
                   help="ringlib's asyncio API, its blocking facade, or both side by side "
                        "(default: both)")
    p.add_argument("--crossover", action="store_true",
                   help="time recursive doubling against the ring, side by side")
    p.add_argument("--collective", choices=COLLECTIVES, default=collective,
                   help=argparse.SUPPRESS)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    return p


def _validate(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.sizes is None:
        args.sizes = parse_sizes(CROSSOVER_SIZES if args.crossover else DEFAULT_SIZES)
    args.api = APIS[args.api]
    itemsize = BY_NAME[args.dtype].itemsize
    unit = itemsize * args.ranks if args.collective in SPLIT else itemsize
    bad = [s for s in args.sizes if s < unit or s % unit]
    if bad:
        p.error(f"sizes {bad} are not whole multiples of {unit} bytes ({args.dtype}"
                f"{f' x {args.ranks} ranks' if args.collective in SPLIT else ''})")
    if args.ranks < 2:
        p.error("-n must be at least 2: a ring of one sends nothing")
    if args.collective == "latency" and args.ranks != 2:
        p.error("latency is a ping-pong between two ranks: -n 2")
    if (args.crossover or args.segment) and args.collective != "allreduce":
        p.error("--crossover and --segment compare all-reduce settings")
    several = [f"--{name}" for name in SETTINGS if len(getattr(args, name) or []) > 1]
    if len(several) + args.crossover > 1:
        p.error("compare one setting at a time: --crossover, or several values of one of "
                + ", ".join(f"--{name}" for name in SETTINGS))
    if args.segment and min(args.segment) < 1:
        p.error("--segment must be at least 1 byte")
    if (args.iters is not None and args.iters < 1) or args.warmup < 0:
        p.error("--iters must be at least 1 and --warmup at least 0")
    if args.json and not args.json.parent.is_dir():
        p.error(f"--json: no directory {args.json.parent}")
    if args.plot and not args.plot.parent.is_dir():
        p.error(f"--plot: no directory {args.plot.parent}")


def main(argv: list[str] | None = None, collective: str = "allreduce") -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = parser(collective)
    args = p.parse_args(argv)
    _validate(p, args)
    if args.worker:
        exit_with_parent()
        asyncio.run(run_worker(args))
        return
    skipped: dict[str, str] = {}
    mpirun = "mpi" in args.compare
    if mpirun and (why := mpirun_missing()):
        skipped["mpi"], mpirun = why, False
        args.compare.remove("mpi")
    env = {}
    if "gloo" in args.compare:
        env[STORE_VARIABLE] = f"127.0.0.1:{free_tcp_ports(1)[0]}"
    report = Report(args, argv, skipped)
    worker_argv = [*argv, "--collective", args.collective,
                   "--compare", ",".join(args.compare)]
    try:
        with contextlib.ExitStack() as stack:
            directory = stack.enter_context(tempfile.TemporaryDirectory(prefix="rl-"))
            if "curve" in args.compare:
                env.update(_curve_ring(args, directory))
            if "blocking" in args.api:
                env[BLOCKING_PEERS_VARIABLE] = ",".join(
                    local_addresses(args.ranks, args.transport, f"{directory}/blocking"))
            run_ranks(__spec__.name, worker_argv, args.ranks, args.transport, report, env,
                      mpirun)
    except WorkerFailed as exc:
        sys.exit(f"{args.collective} benchmark failed: {exc}")
    except KeyboardInterrupt:
        sys.exit(f"{args.collective} benchmark interrupted; every rank was stopped")
    finally:
        report.close()
    print(report.footer(), file=sys.stdout, flush=True)
    report.save()


def _curve_ring(args: argparse.Namespace, directory: str) -> dict[str, str]:
    """The variables of a second ring, with a new key pair in `directory`."""
    _, secret = generate(f"{directory}/keys")
    peers = local_addresses(args.ranks, args.transport, directory)
    return {CURVE_KEY_VARIABLE: str(secret), CURVE_PEERS_VARIABLE: ",".join(peers)}


if __name__ == "__main__":
    main()
