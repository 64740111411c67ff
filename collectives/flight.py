"""The flight recorder: the last collectives of a rank, kept in memory, written out when one
fails or the process gets SIGUSR1, so that a hang or a mismatch can be read after the fact
(as NCCL's TORCH_NCCL_DUMP_ON_TIMEOUT).

Each collective costs one small record, made where it takes its number (session.py) and
closed where it ends, done or failed: no message, no lock. A record points at what runs the
collective while it runs, to ask it which peer it waits on when a dump comes mid-wait, and
lets go of it when it ends, so that no buffer outlives its collective here. A timeline
(runtime/timeline.py), where one is on, sees every record as it closes.
"""

from __future__ import annotations

import collections
import logging
import os
import time
from typing import Any, Protocol

from ringlib.errors import CollectiveTimeout, MismatchError, PeerLost

log = logging.getLogger("ringlib.flight")

KEPT = 256  # the collectives a rank remembers
_clock = time.monotonic_ns
DUMPED_ON = (CollectiveTimeout, PeerLost, MismatchError)


class Source(Protocol):
    """What runs a collective, as the recorder asks it."""

    def waiting_on(self) -> int | None:
        """The rank it waits for now, if it waits."""


# An entry is a list, not an object: made and closed for every collective, a list costs
# half what an instance of a class with slots does (0.6 against 1.1 us, measured).
# Its fields, by index: the collective's number, signature, bytes and algorithm (where the
# signature does not say it); when it started and ended (the monotonic clock, ns; 0: not
# yet); how it ended ("running", "done", or the error's class); the rank it waited for when
# it failed; and, while it runs, its Source.
SEQ, SIG, NBYTES, ALGORITHM, STARTED, ENDED, OUTCOME, WAITED, SOURCE = range(9)
Entry = list


def waiting_on(entry: Entry) -> int | None:
    """The rank a collective waits for (or waited for, when it failed)."""
    source = entry[SOURCE]
    return source.waiting_on() if source is not None else entry[WAITED]


class FlightRecorder:
    """The last KEPT collectives of one rank, across re-forms of its ring."""

    def __init__(self, rank: int, kept: int = KEPT, directory: str | None = None) -> None:
        self.rank = rank
        self.generation = 0  # the ring's, stamped on what the timeline sees
        self.directory = directory
        self._timeline: Any = None
        self._dumped: set[int] = set()  # ids of the failures already written out
        self.entries: collections.deque[Entry] = collections.deque(maxlen=0)
        self.keep(kept)

    def keep(self, kept: int) -> None:
        """Keep the last `kept` collectives from now on (0: none, and record nothing
        unless a timeline is on)."""
        self.entries = collections.deque(self.entries, maxlen=kept)
        self._append = self.entries.append
        self._recording = kept > 0 or self._timeline is not None

    @property
    def timeline(self) -> Any:
        """A runtime Timeline that records each closed entry, or None."""
        return self._timeline

    @timeline.setter
    def timeline(self, timeline: Any) -> None:
        self._timeline = timeline
        self._recording = self.entries.maxlen > 0 or timeline is not None

    def opened(self, seq: int, sig: str, nbytes: int, source: Source | None,
               algorithm: str = "") -> Entry | None:
        """Remember a collective that has just taken its number (None: nothing records)."""
        if not self._recording:
            return None
        entry = [seq, sig, nbytes, algorithm, _clock(), 0, "running", None, source]
        self._append(entry)
        return entry

    def closed(self, entry: Entry | None, exc: BaseException | None = None) -> None:
        """A collective ended: done, or failed with `exc`; a failure users must diagnose
        (DUMPED_ON) writes the recorder out, once for each failure."""
        if entry is None:
            return
        entry[ENDED] = _clock()
        if exc is None and self._timeline is None:
            entry[OUTCOME], entry[SOURCE] = "done", None
            return
        if exc is None:
            entry[OUTCOME] = "done"
        else:
            entry[OUTCOME] = type(exc).__name__
            if entry[SOURCE] is not None:
                entry[WAITED] = entry[SOURCE].waiting_on()
        entry[SOURCE] = None
        if self._timeline is not None:
            self._timeline.collective(entry, self.generation, exc)
        if isinstance(exc, DUMPED_ON) and id(exc) not in self._dumped:
            if len(self._dumped) > KEPT:
                self._dumped.clear()
            self._dumped.add(id(exc))
            self.dump(f"{type(exc).__name__}: {exc}")

    def lines(self) -> list[str]:
        """The recorder as text, oldest first: a line a collective."""
        now = time.monotonic_ns()
        rows = []
        for entry in list(self.entries):
            took = ((entry[ENDED] or now) - entry[STARTED]) / 1e6
            peer = waiting_on(entry) if entry[OUTCOME] != "done" else None
            rows.append(f"  #{entry[SEQ]:<7} {entry[OUTCOME]:<17} {took:10.3f} ms "
                        f"{entry[NBYTES]:>11} B  {entry[SIG]}"
                        + ("" if peer is None else f"  (waiting for rank {peer})"))
        return rows

    def dump(self, reason: str) -> str | None:
        """Write the recorder to the log, and to a file in `directory` if one is set;
        return that file's path."""
        text = (f"ringlib flight recorder, rank {self.rank} (pid {os.getpid()}, generation "
                f"{self.generation}): {reason}\n  seq      outcome           time          "
                "size  signature\n" + "\n".join(self.lines()) + "\n")
        log.warning("%s", text)
        if not self.directory:
            return None
        os.makedirs(self.directory, exist_ok=True)
        path = os.path.join(self.directory, f"flight-rank{self.rank}-{os.getpid()}.txt")
        with open(path, "a") as out:
            out.write(text)
        return path
