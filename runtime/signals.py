"""What a ringlib process does when it ends or is asked to: write its timelines at exit
and on SIGTERM (timeline.py), and dump its flight recorders on SIGUSR1 (collectives/
flight.py), as NCCL's flight recorder dumps on a signal.

Handlers are installed once, from the main thread (Python lets no other), and only over
the default action: a program that handles SIGTERM or SIGUSR1 itself keeps its handler.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import threading
import weakref
from typing import Any

from ringlib.collectives.flight import FlightRecorder

from .timeline import write_all

_recorders: weakref.WeakSet[FlightRecorder] = weakref.WeakSet()
_installed: set[str] = set()
_lock = threading.Lock()


def watch(recorder: FlightRecorder) -> None:
    """Dump `recorder` on SIGUSR1 while it lives."""
    _recorders.add(recorder)


def install(timeline: bool = False) -> None:
    """Dump flight recorders on SIGUSR1; with `timeline` (one is on), write timelines at
    exit and on SIGTERM too. Off the main thread only the exit hook goes in: the signals
    wait for a call from the main thread."""
    with _lock:
        if timeline and "exit" not in _installed:
            atexit.register(write_all)
            _installed.add("exit")
        if threading.current_thread() is not threading.main_thread():
            return
        wanted = [("SIGUSR1", _dump_recorders)] + ([("SIGTERM", _terminated)] if timeline else [])
        for name, handler in wanted:
            if name not in _installed:
                signum = getattr(signal, name)
                if signal.getsignal(signum) is signal.SIG_DFL:
                    signal.signal(signum, handler)
                _installed.add(name)


def _terminated(signum: int, frame: Any) -> None:
    """SIGTERM: write the timelines, then end as SIGTERM's default does."""
    with contextlib.suppress(Exception):
        write_all()
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


def _dump_recorders(signum: int, frame: Any) -> None:
    for recorder in list(_recorders):
        with contextlib.suppress(OSError):
            recorder.dump("SIGUSR1")
