"""Benchmark ranks as real processes on this host: start them, follow rank 0's JSON lines,
and leave nothing behind, whatever happens.

The parent runs `python -m MODULE --worker ARGS` once per rank with RINGLIB_* variables;
a worker calls exit_with_parent() first, so that it dies with a parent killed outright.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, TextIO

from ringlib.runtime.environment import without_placement
from ringlib.transport.addresses import local_addresses

GRACE_S = 30.0             # how long the other ranks may take to exit after rank 0


def exit_with_parent() -> None:
    """Exit at once when stdin (the parent's pipe) closes: a parent killed outright
    leaves no rank behind."""
    def watch() -> None:
        while os.read(0, 4096):  # raw reads: a buffered stdin would block interpreter exit
            pass
        os._exit(3)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


class WorkerFailed(RuntimeError):
    """A rank exited non-zero or hung; the message carries the ends of their stderr."""


def _rank_env(rank: int, peers: list[str]) -> dict[str, str]:
    """os.environ without any launcher's placement, plus this rank's RINGLIB_* variables."""
    return {**without_placement(os.environ), "RINGLIB_RANK": str(rank), "RINGLIB_WORLD_SIZE": str(len(peers)),
            "RINGLIB_PEERS": ",".join(peers)}


def _start(module: str, rank: int, peers: list[str], argv: list[str],
           log: Path) -> subprocess.Popen:
    with open(log, "w") as err:
        return subprocess.Popen(
            [sys.executable, "-m", module, "--worker", *argv],
            env=_rank_env(rank, peers), stdin=subprocess.PIPE, stderr=err, text=True,
            stdout=subprocess.PIPE if rank == 0 else subprocess.DEVNULL, start_new_session=True)


def run_ranks(module: str, argv: list[str], ranks: int, transport: str,
              on_line: Callable[[dict], None]) -> None:
    """Run `python -m module --worker *argv` as `ranks` ranks wired by RINGLIB_* variables
    (free tcp ports on loopback, or ipc paths in a private temporary directory) to the end,
    passing each of rank 0's JSON lines to `on_line`. Every process is killed and reaped
    whatever happens (error, Ctrl-C, SIGTERM)."""
    procs: list[subprocess.Popen] = []
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        with tempfile.TemporaryDirectory(prefix="rl-") as tmp:  # short: ipc paths cap at 107
            logs = [Path(tmp, f"rank{r}.stderr") for r in range(ranks)]
            try:
                peers = local_addresses(ranks, transport, tmp)
                for rank in range(ranks):
                    procs.append(_start(module, rank, peers, argv, logs[rank]))
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
    done_at = None  # when rank 0's output ended
    while True:
        failed = [r for r, p in enumerate(procs) if p.poll() not in (None, 0)]
        if failed:
            raise WorkerFailed(_failure_report(procs, logs, failed))
        if done_at is not None and all(p.poll() == 0 for p in procs):
            return
        if done_at is not None and time.monotonic() > done_at + GRACE_S:
            raise WorkerFailed(_failure_report(procs, logs, []))
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


def collect(module: str, argv: list[str], ranks: int, what: str) -> list[dict]:
    """Run the ranks over tcp and return rank 0's JSON lines; exit with a message naming
    the benchmark if a rank fails or the run is interrupted."""
    results: list[dict] = []
    try:
        run_ranks(module, argv, ranks, "tcp", results.append)
    except WorkerFailed as exc:
        raise SystemExit(f"{what} benchmark failed: {exc}") from None
    except KeyboardInterrupt:
        raise SystemExit(f"{what} benchmark interrupted; every rank was stopped") from None
    return results
