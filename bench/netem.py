"""All-reduce throughput under network faults, clean and faulty side by side in one run.

    ringlib bench netem [-n 3] [--sizes 8B,64KiB,4MiB,16MiB] [--delay 20ms]
        [--loss 1%] [--iters N] [--seed S] [--timeout 120] [--link auto|netem|switch]
        [--json PATH]

Needs root. Each rank runs in a network namespace of its own, joined to the others at a
hub namespace (netem_hosts.py), as netem_rank.py under `ip netns exec`. Size by size the
ranks run float32 sum all-reduces on a clean link, then with DELAY and LOSS on every
rank's link (and, where a user-space switch brings the faults because the kernel has no
netem, through the switch without faults), each result checked against a float64
reference. The table gives rank 0's median time per call, algbw and busbw (nccl-tests'),
faulty time over clean time, and how many frames the faults dropped. Ranks, namespaces
and links are removed whatever happens: an error, Ctrl-C or SIGTERM. `make faults` runs
it with the defaults.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import queue
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Iterator, TextIO

from ringlib.runtime import processes

from .netem_hosts import LINKS, Faults, Hosts, HostsError, signals_deferred, unsupported
from .results import write_json
from .systems import BUS_FACTOR
from .timing import format_size, parse_size_list

DEFAULT_SIZES = "8B,64KiB,4MiB,16MiB"
PORT = 29500               # every rank has an address of its own, so one port serves all
STOP_S = 5.0               # how long ranks may take to exit on SIGTERM
READY_S = 120.0            # how long ranks may take to start and meet (Numba's first load)
LINK_NAMES = {"netem": "veth pairs to a bridge; faults by tc netem on each rank's veth",
              "switch": "veth pairs to a bridge; faults by a user-space switch (netem_switch.py) "
                        "that every frame takes while they are on"}


class RankFailed(RuntimeError):
    """A rank exited early; the message carries the ends of the ranks' stderr."""


class Ranks:
    """One netem_rank process per namespace, spoken to by JSON lines on stdin and stdout."""

    def __init__(self, hosts: Hosts, seed: int, timeout: float, logs: Path) -> None:
        peers = ",".join(f"tcp://{address}:{PORT}" for address in hosts.addresses)
        self.logs = [logs / f"rank{r}.stderr" for r in range(len(hosts.names))]
        self.procs: list[subprocess.Popen] = []
        self.lines: queue.Queue[tuple[int, str]] = queue.Queue()
        try:
            for rank, name in enumerate(hosts.names):
                # Namespaces share this host's /dev/shm: shared memory would carry the
                # payloads around the faulty links under test.
                env = {**os.environ, "PYTHONUNBUFFERED": "1", "RINGLIB_RANK": str(rank),
                       "RINGLIB_WORLD_SIZE": str(len(hosts.names)), "RINGLIB_PEERS": peers,
                       "RINGLIB_SHM_BYTES": "0"}
                self.procs.append(self._start(name, env, self.logs[rank], seed, timeout))
                threading.Thread(target=self._pump, args=(rank,), daemon=True).start()
            self._gather(time.monotonic() + READY_S)
        except BaseException:
            self.close()
            raise

    @staticmethod
    def _start(namespace: str, env: dict[str, str], log: Path, seed: int,
               timeout: float) -> subprocess.Popen:
        with open(log, "w") as err:
            return subprocess.Popen(
                ["ip", "netns", "exec", namespace, sys.executable, "-m",
                 "ringlib.bench.netem_rank", "--seed", str(seed), "--timeout", str(timeout)],
                env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True,
                start_new_session=True)

    def _pump(self, rank: int) -> None:
        stream = self.procs[rank].stdout
        assert stream is not None
        for line in stream:
            self.lines.put((rank, line))

    def run(self, command: dict[str, Any]) -> list[dict[str, Any]]:
        """Every rank's answer to `command`, by rank."""
        for proc in self.procs:
            assert proc.stdin is not None
            with contextlib.suppress(BrokenPipeError):  # a rank gone: _gather says which
                proc.stdin.write(json.dumps(command) + "\n")
                proc.stdin.flush()
        return self._gather(None)

    def _gather(self, deadline: float | None) -> list[dict[str, Any]]:
        """One JSON line from each rank; raise RankFailed if one exits or `deadline` passes
        (without one, each rank's collective timeout bounds the wait)."""
        answers: list[dict[str, Any] | None] = [None] * len(self.procs)
        while None in answers:
            exited = [r for r, proc in enumerate(self.procs) if proc.poll() is not None]
            if exited:
                raise RankFailed(self._report(f"rank {', '.join(map(str, exited))} exited"))
            if deadline is not None and time.monotonic() > deadline:
                raise RankFailed(self._report(f"the ranks did not meet within {READY_S:g} s"))
            try:
                rank, line = self.lines.get(timeout=0.05)
            except queue.Empty:
                continue
            if line.startswith("{"):
                answers[rank] = json.loads(line)
            else:
                sys.stderr.write(f"[rank {rank}] {line}")
        return [a for a in answers if a is not None]

    def _report(self, what: str) -> str:
        """`what`, then each rank's state and the end of its stderr."""
        parts = []
        for rank, (proc, log) in enumerate(zip(self.procs, self.logs)):
            state = "running" if proc.poll() is None else f"exit {proc.poll()}"
            tail = log.read_text(errors="replace")[-2000:].rstrip() if log.exists() else ""
            parts.append(f"--- rank {rank} ({state}) stderr:\n{tail}")
        return f"{what}\n" + "\n".join(parts)

    def close(self) -> None:
        """SIGTERM every rank still running, SIGKILL its session after STOP_S, reap all."""
        with signals_deferred():
            for proc in self.procs:
                if proc.poll() is None:
                    proc.terminate()
            deadline = time.monotonic() + STOP_S
            for proc in self.procs:
                try:
                    proc.wait(max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()


def cell(answers: list[dict[str, Any]], world: int, lost: tuple[int, int]) -> dict[str, Any]:
    """One size under one condition: rank 0's median time and bandwidths, what was checked,
    and (frames sent, frames dropped) on the links meanwhile."""
    if len({a["digest"] for a in answers}) != 1:
        raise RankFailed(f"ranks ended with different results at {answers[0]['bytes']} "
                         f"bytes ({answers[0]['label']}): digests "
                         f"{[a['digest'] for a in answers]}")
    first, nbytes = answers[0], answers[0]["bytes"]
    p50 = statistics.median(first["times"])
    algbw = nbytes / p50 / 1e6
    return {"iters": first["iters"], "p50_s": p50, "min_s": min(first["times"]),
            "max_s": max(first["times"]), "algbw_mbs": algbw,
            "busbw_mbs": algbw * BUS_FACTOR["allreduce"](world),
            "checked": sum(a["checked"] for a in answers),
            "max_error": max(a["max_error"] for a in answers),
            "frames": lost[0], "dropped": lost[1]}


def conditions(kind: str, faults: Faults) -> list[tuple[str, Faults | None]]:
    """The links each size runs on, in turn: clean, faulty, and for the switch the switch
    without faults, which tells its own cost apart from the faults'."""
    switch = [("switch", Faults(0.0, 0.0))] if kind == "switch" else []
    return [("clean", None), ("faulty", faults), *switch]


def measure(hosts: Hosts, ranks: Ranks, sizes: list[int], iters: int,
            faults: Faults) -> Iterator[dict[str, Any]]:
    """Per size, a row: a cell per condition, the link switched between them."""
    assert hosts.link is not None
    for nbytes in sizes:
        row: dict[str, Any] = {"bytes": nbytes}
        for label, applied in conditions(hosts.link.kind, faults):
            hosts.link.set_faults(applied)
            answers = ranks.run({"label": label, "bytes": nbytes, "iters": iters})
            row[label] = cell(answers, len(hosts.names), hosts.link.loss_counts())
        hosts.link.set_faults(None)
        yield row


GROUP = [("iters", 5), ("p50 ms", 9), ("algbw MB/s", 10), ("busbw MB/s", 10)]
RATIOS = [("faulty/clean", 12), ("frames lost", 16)]
SWITCH = [("p50 ms", 9), ("faulty/switch", 13)]


def columns(kind: str) -> list[tuple[str, int]]:
    return [("size", 9), *GROUP, *GROUP, *RATIOS, *(SWITCH if kind == "switch" else [])]


def header(kind: str) -> str:
    """Column names under a line that says which columns are which."""
    cols = columns(kind)
    names = " ".join(f"{name:>{width}}" for name, width in cols)
    spans = [("clean", 1, 5), ("faulty", 5, 9), ("", 9, 11), ("switch alone", 11, 13)]
    groups = [" " * cols[0][1]]
    for title, a, b in spans[:len(spans) if kind == "switch" else 3]:
        width = sum(w + 1 for _, w in cols[a:b]) - 1
        groups.append(f"{f' {title} ':-^{width}}" if title else " " * width)
    return f"{' '.join(groups)}\n{names}\n{'-' * len(names)}"


def line(row: dict[str, Any], kind: str) -> str:
    clean, faulty = row["clean"], row["faulty"]
    values: list[object] = [format_size(row["bytes"])]
    for c in (clean, faulty):
        values += [c["iters"], f"{c['p50_s'] * 1e3:.3f}", f"{c['algbw_mbs']:.3g}",
                   f"{c['busbw_mbs']:.3g}"]
    lost = f"{faulty['dropped'] / max(faulty['frames'], 1):.1%} of {faulty['frames']}"
    values += [f"{faulty['p50_s'] / clean['p50_s']:.2f}", lost]
    if kind == "switch":
        switch = row["switch"]
        values += [f"{switch['p50_s'] * 1e3:.3f}", f"{faulty['p50_s'] / switch['p50_s']:.2f}"]
    return " ".join(f"{v:>{width}}" for v, (_, width) in zip(values, columns(kind)))


def summary(rows: list[dict[str, Any]]) -> str:
    """What was checked, and the slowest faulty call: losses make a long tail."""
    cells = [c for r in rows for c in r.values() if isinstance(c, dict)]
    slowest = max(rows, key=lambda r: r["faulty"]["max_s"])
    return (f"checked {sum(c['checked'] for c in cells)} results (every call on every rank) "
            f"against the float64 reference: all within rounding, largest error "
            f"{max(c['max_error'] for c in cells):.3g}; all ranks bit-identical\n"
            f"slowest faulty call: {slowest['faulty']['max_s'] * 1e3:.0f} ms at "
            f"{format_size(slowest['bytes'])}")


def parse_delay(text: str) -> float:
    """'20ms', '500us', '0.1s' or a plain number of milliseconds, as seconds."""
    units = {"us": 1e-6, "ms": 1e-3, "s": 1.0}
    number, unit = text.strip(), "ms"
    for suffix in units:  # "us" and "ms" before "s"
        if number.endswith(suffix):
            number, unit = number[: -len(suffix)], suffix
            break
    try:
        value = float(number) * units[unit]
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad delay {text!r}: want e.g. 20ms") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"delay {text!r} is negative")
    return value


def parse_loss(text: str) -> float:
    """'1%' or '1' (percent, as netem reads it), as a fraction."""
    try:
        value = float(text.strip().removesuffix("%")) / 100
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad loss {text!r}: want a percentage, e.g. 1%") from None
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"loss {text!r} is not in [0%, 100%)")
    return value


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="ringlib bench netem",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", "--ranks", type=int, default=3, help="ranks, one namespace each")
    parser.add_argument("--sizes", type=parse_size_list, default=parse_size_list(DEFAULT_SIZES),
                        help=f"bytes per all-reduce, comma separated (default {DEFAULT_SIZES})")
    parser.add_argument("--delay", type=parse_delay, default=0.020, help="one-way delay added "
                        "to every frame a rank sends (default 20ms)")
    parser.add_argument("--loss", type=parse_loss, default=0.01,
                        help="share of a rank's frames dropped (default 1%%)")
    parser.add_argument("--iters", type=int, default=0, help="timed calls per size and link "
                        "(default: as many as fit 4 s, 9 to 50)")
    parser.add_argument("--seed", type=int, help="seeds the inputs and the switch's losses")
    parser.add_argument("--timeout", type=float, default=120.0,
                        help="deadline of each collective, seconds (TCP retransmits are slow)")
    parser.add_argument("--link", choices=[*LINKS, "auto"], default="auto",
                        help="netem, the user-space switch, or netem where the kernel has it")
    parser.add_argument("--json", type=Path, help="write every figure here")
    args = parser.parse_args(argv)
    args.argv = argv
    if args.ranks < 2 or args.iters < 0 or not all(s >= 4 and s % 4 == 0 for s in args.sizes):
        parser.error("want -n >= 2, --iters >= 0 and sizes that are whole float32s, >= 4 B")
    return args


def run(args: argparse.Namespace, out: TextIO) -> dict[str, Any]:
    """Set up the hosts and ranks, print the table row by row, tear everything down."""
    faults = Faults(args.delay, args.loss)
    with tempfile.TemporaryDirectory(prefix="rl-netem-") as logs, \
            Hosts(args.ranks, args.link, args.seed) as hosts:
        assert hosts.link is not None
        print(f"all-reduce float32 sum, {args.ranks} ranks in namespaces {hosts.names[0]}.., "
              f"seed {args.seed}\nlink: {LINK_NAMES[hosts.link.kind]}\nfaulty: delay "
              f"{args.delay * 1e3:g} ms, loss {args.loss:.2%} per frame sent", file=out)
        ranks = Ranks(hosts, args.seed, args.timeout, Path(logs))
        try:
            print(header(hosts.link.kind), file=out, flush=True)
            rows = []
            for row in measure(hosts, ranks, args.sizes, args.iters, faults):
                rows.append(row)
                print(line(row, hosts.link.kind), file=out, flush=True)
        finally:
            ranks.close()
        print(summary(rows), file=out)
        return {"benchmark": "netem", "command": ["python", "-m", "ringlib.bench.netem",
                                                  *args.argv],
                "ranks": args.ranks, "seed": args.seed, "link": hosts.link.kind,
                "faults": {"delay_s": args.delay, "loss": args.loss},
                "namespaces": [hosts.hub, *hosts.names], "rows": rows}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    problem = unsupported()
    if problem:
        print(f"netem benchmark: {problem}", file=sys.stderr)
        return 2
    args.seed = random.randrange(2**31) if args.seed is None else args.seed
    try:
        with processes.sigterm_as_interrupt():
            document = run(args, sys.stdout)
    except (RankFailed, HostsError) as exc:
        print(f"netem benchmark failed (seed {args.seed}): {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("netem benchmark interrupted; ranks stopped, namespaces deleted", file=sys.stderr)
        return 130
    if args.json:
        write_json(args.json, document)
    return 0


if __name__ == "__main__":
    sys.exit(main())
