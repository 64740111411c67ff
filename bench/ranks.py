"""Benchmark ranks as real processes on this host: start them, follow rank 0's JSON lines,
and leave nothing behind, whatever happens.

The parent runs `python -m MODULE --worker ARGS` once per rank with RINGLIB_* variables,
or all ranks under one `mpirun` (whose ranks then are MPI ranks too, for comparisons with
MPI), where RINGLIB_PEERS gives the addresses and mpirun the rank. Ranks are started and
stopped with ringlib.runtime.processes; a worker calls exit_with_parent() first, so that
it dies with its parent even when that is mpirun, killed outright.
"""

from __future__ import annotations

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
from pathlib import Path
from typing import Callable, TextIO

from ringlib.runtime import processes
from ringlib.runtime.environment import without_placement
from ringlib.runtime.processes import exit_with_parent
from ringlib.transport.addresses import local_addresses

__all__ = ["WorkerFailed", "collect", "exit_with_parent", "mpirun_missing", "run_ranks"]

GRACE_S = 30.0             # how long the other ranks may take to exit after rank 0
STOP_S = 5.0               # how long processes may take to exit on SIGTERM


def mpirun_missing() -> str | None:
    """Why ranks cannot run under mpirun with mpi4py here, or None if they can."""
    import importlib.util

    if shutil.which("mpirun") is None:
        return "mpirun is not on PATH (Debian: apt-get install openmpi-bin libopenmpi-dev)"
    if importlib.util.find_spec("mpi4py") is None:
        return "mpi4py is not installed (pip install mpi4py)"
    return None


class WorkerFailed(RuntimeError):
    """A rank exited non-zero or hung; the message carries the ends of their stderr."""


def _start(command: list[str], env: dict[str, str], log: Path, reads_stdout: bool,
           on_parent_death: int = signal.SIGKILL) -> subprocess.Popen:
    with open(log, "w") as err:
        return processes.start(command, env, on_parent_death, stderr=err, text=True,
                               stdout=subprocess.PIPE if reads_stdout else subprocess.DEVNULL)


def _start_each(module: str, argv: list[str], env: dict[str, str], peers: list[str],
                tmp: str) -> tuple[list[subprocess.Popen], list[Path], list[str]]:
    """One process per rank, placed by RINGLIB_RANK/WORLD_SIZE/PEERS."""
    procs, logs = [], [Path(tmp, f"rank{r}.stderr") for r in range(len(peers))]
    for rank, log in enumerate(logs):
        placed = {**env, "RINGLIB_RANK": str(rank), "RINGLIB_WORLD_SIZE": str(len(peers)),
                  "RINGLIB_PEERS": ",".join(peers)}
        procs.append(_start([sys.executable, "-m", module, "--worker", *argv], placed, log,
                            rank == 0))
    return procs, logs, [f"rank {r}" for r in range(len(peers))]


def _start_mpirun(module: str, argv: list[str], env: dict[str, str], peers: list[str],
                  tmp: str) -> tuple[list[subprocess.Popen], list[Path], list[str]]:
    """All ranks under one mpirun, unbound (mpirun would pin each rank, and with it
    ringlib's and Gloo's threads, to one core); mpirun places them, RINGLIB_PEERS wires
    the ring. mpirun gets SIGTERM if the benchmark dies, and stops its ranks."""
    placed = {**env, "RINGLIB_PEERS": ",".join(peers)}
    if os.geteuid() == 0:
        placed.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    command = ["mpirun", "-n", str(len(peers)), "--bind-to", "none", "--oversubscribe",
               sys.executable, "-m", module, "--worker", *argv]
    log = Path(tmp, "mpirun.stderr")
    return [_start(command, placed, log, True, signal.SIGTERM)], [log], ["mpirun"]


def run_ranks(module: str, argv: list[str], ranks: int, transport: str,
              on_line: Callable[[dict], None], env: dict[str, str] | None = None,
              mpirun: bool = False) -> None:
    """Run `python -m module --worker *argv` as `ranks` ranks wired by RINGLIB_* variables
    (free tcp ports on loopback, or ipc paths in a private temporary directory) to the end,
    passing each of rank 0's JSON lines to `on_line`; `env` is added to their environment.
    With `mpirun` the ranks are started by mpirun. Every process is killed and reaped
    whatever happens (error, Ctrl-C, SIGTERM)."""
    procs: list[subprocess.Popen] = []
    with processes.sigterm_as_interrupt(), \
            tempfile.TemporaryDirectory(prefix="rl-") as tmp:  # short: ipc paths cap at 107
        try:
            peers = local_addresses(ranks, transport, tmp)
            start = _start_mpirun if mpirun else _start_each
            procs, logs, names = start(module, argv, {**without_placement(os.environ),
                                                      **(env or {})}, peers, tmp)
            _follow(procs, logs, names, on_line)
        finally:
            processes.stop(procs, STOP_S)  # mpirun stops its ranks on SIGTERM


def _follow(procs: list[subprocess.Popen], logs: list[Path], names: list[str],
            on_line: Callable[[dict], None]) -> None:
    """Hand on rank 0's lines until every rank has exited 0; raise WorkerFailed otherwise."""
    lines: queue.Queue[str | None] = queue.Queue()
    threading.Thread(target=_pump, args=(procs[0].stdout, lines), daemon=True).start()
    done_at = None  # when rank 0's output ended
    while True:
        failed = [r for r, p in enumerate(procs) if p.poll() not in (None, 0)]
        if failed:
            raise WorkerFailed(_failure_report(procs, logs, names, failed))
        if done_at is not None and all(p.poll() == 0 for p in procs):
            return
        if done_at is not None and time.monotonic() > done_at + GRACE_S:
            raise WorkerFailed(_failure_report(procs, logs, names, []))
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


def _failure_report(procs: list[subprocess.Popen], logs: list[Path], names: list[str],
                    failed: list[int]) -> str:
    ranks = failed or [r for r, p in enumerate(procs) if p.poll() is None]
    what = "exited non-zero" if failed else f"still running {GRACE_S:g} s after rank 0 ended"
    parts = [f"{', '.join(names[r] for r in ranks)} {what}"]
    for r in ranks:
        tail = logs[r].read_text(errors="replace")[-3000:] if logs[r].exists() else ""
        parts.append(f"--- {names[r]} (exit {procs[r].poll()}) stderr:\n{tail.rstrip()}")
    return "\n".join(parts)


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
