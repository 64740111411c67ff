"""Child processes that go when their parent goes, and leave nothing behind when stopped:
the one helper with which the launcher, the benchmarks and the tests start their ranks.

Each child runs in a session (and so a process group) of its own, so that stopping it
stops whatever it started too, and asks the kernel for a signal when its parent dies
(PR_SET_PDEATHSIG), so that a parent killed outright takes its children with it.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

_PR_SET_PDEATHSIG = 1


def die_with_parent(signum: int = signal.SIGKILL) -> Callable[[], None]:
    """A preexec_fn that has the child sent `signum` when its parent dies, even by SIGKILL."""
    def arm() -> None:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signum)
    return arm


def exit_with_parent() -> None:
    """In a rank whose parent is not ringlib's (mpirun's ranks): exit at once when the
    parent is gone, from a thread that watches it."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.1)
        os._exit(3)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def start(argv: list[str], env: dict[str, str], on_parent_death: int = signal.SIGKILL,
          **options: Any) -> subprocess.Popen:
    """Start `argv` in a session of its own, sent `on_parent_death` if this process dies;
    `options` go to Popen (stdout, stderr, text, ...); stdin is closed."""
    return subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, start_new_session=True,
                            preexec_fn=die_with_parent(on_parent_death), **options)


def signal_group(pid: int, signum: int) -> None:
    """Send `signum` to the process group that `pid` leads, if it is still there."""
    try:
        os.killpg(pid, signum)
    except ProcessLookupError:
        pass


def stop(procs: list[subprocess.Popen], grace: float) -> None:
    """Stop every process that still runs: SIGTERM, then after `grace` seconds SIGKILL to
    its whole group (grace 0: SIGKILL at once); reap every one."""
    running = [p for p in procs if p.poll() is None]
    if grace > 0:
        for p in running:
            p.terminate()
        deadline = time.monotonic() + grace
        for p in running:
            try:
                p.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
    for p in procs:
        if p.poll() is None:
            signal_group(p.pid, signal.SIGKILL)
    for p in procs:
        p.wait()


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM raises KeyboardInterrupt, as Ctrl-C does, so that the
    cleanup a Ctrl-C runs (finally blocks: stopping ranks, deleting namespaces) runs for
    it too; the previous handler comes back after."""
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def processes_with(tag: str) -> list[int]:
    """Live processes whose environment holds `tag` (NAME=value): the children, and their
    children, of a run that put the tag in its environment."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                environ = (entry / "environ").read_bytes().split(b"\0")
            except OSError:  # gone meanwhile, or not ours to read
                continue
            if tag.encode() in environ:
                found.append(int(entry.name))
    return found
