"""A rank's timeline: what its ring did, as a Chrome/Perfetto trace (the Trace Event
Format, https://ui.perfetto.dev opens it), as Horovod's timeline shows a job.

pid is the rank; times are microseconds of the wall clock of rank 0 (this rank's
monotonic clock, set on its wall clock when the timeline starts and moved by the offset
to rank 0's measured at start: runtime/clock.py), so that `ringlib trace` lays the ranks'
files side by side. Each collective is an async span `ringlib:<name>` (so that collectives
in flight at once never overlap wrongly), with its phases nested in it; instants mark
PeerLost, MismatchError and re-forms; other parts (gradient buckets, pipeline stages) add
complete spans on threads of their own.

Events are kept in memory, the oldest dropped past `cap` (a collective, with its kernel's
phase, counts as one: it is kept as one tuple), and the file is written whole
to a temporary name and renamed over the last one, every FLUSH_S while events come, when
the timeline stops, and at exit (normal, an exception, Ctrl-C, SIGTERM: runtime/signals.py):
whenever the process ends, the file is valid JSON.
"""

from __future__ import annotations

import collections
import json
import os
import threading
import time
import weakref
from typing import Any

from ringlib.collectives import flight
from ringlib.collectives.flight import Entry
from ringlib.errors import InvalidArgument
from ringlib.ops import Op

# The events a timeline keeps (RINGLIB_TIMELINE_EVENTS; a collective counts as one, and
# writes 2 to 4): about 110 bytes each written, and writing 100,000 takes 0.5-1 s of one
# core, CHUNK events at a time.
EVENTS = 50_000
CHUNK = 2000
FLUSH_S = 10.0    # how often new events are written out (RINGLIB_TIMELINE_FLUSH_S)
# Threads (tid) of a rank's process in the trace.
COLLECTIVES, LINKS, GRADIENTS, PIPELINE = 1, 2, 3, 10
THREADS = {COLLECTIVES: "collectives", LINKS: "links and membership",
           GRADIENTS: "gradient buckets", PIPELINE: "pipeline"}

_live: weakref.WeakSet[Timeline] = weakref.WeakSet()
_OPS = frozenset(op.value for op in Op)  # the words of a signature that name its op


def path_for(template: str, rank: int, world_size: int) -> str:
    """`template` with {rank} replaced by the rank; a path without {rank} that does not
    end in .json is a directory (made if need be) that gets trace-{rank}.json. One file
    for several ranks would have them overwrite each other's traces: refused."""
    if "{rank}" not in template and not template.endswith(".json"):
        template = os.path.join(template, "trace-{rank}.json")
    elif "{rank}" not in template and world_size > 1:
        raise InvalidArgument(f"rank {rank}: the timeline {template} is one file for "
                              f"{world_size} ranks: put {{rank}} in its name, or name a directory")
    return template.replace("{rank}", str(rank))


class Timeline:
    """The trace one rank writes to `path`."""

    def __init__(self, path: str, rank: int, cap: int | None = None) -> None:
        self.path, self.rank = path, rank
        cap = cap if cap is not None else int(os.environ.get("RINGLIB_TIMELINE_EVENTS", EVENTS))
        self._events: collections.deque[dict | tuple] = collections.deque(maxlen=max(1, cap))
        self._count = 0  # events recorded, dropped ones too
        self._signatures: dict[str, tuple] = {}  # sig -> _about(sig), for the hot path
        self._base_ns = time.time_ns() - time.monotonic_ns()
        self.offset_us = 0.0  # to add for rank 0's clock (clock.py)
        self.clock = "this host's wall clock"
        self._written = -1
        self._stop = threading.Event()
        self._lock = threading.Lock()  # one write at a time
        directory = os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, exist_ok=True)
        self.write()  # a valid file from the start, and a path that is wrong fails here
        self._flusher = threading.Thread(target=self._flush_now_and_then, daemon=True,
                                         name=f"ringlib-timeline-rank{rank}")
        self._flusher.start()
        _live.add(self)

    def us(self, monotonic_ns: int) -> float:
        """A time of the monotonic clock (ns) as this trace's microseconds."""
        return (monotonic_ns + self._base_ns) / 1000.0

    def _add(self, event: dict | tuple) -> None:
        self._events.append(event)
        self._count += 1

    def collective(self, entry: Entry, generation: int, exc: BaseException | None) -> None:
        """A collective that ended (a flight Entry): its span, and an instant if it failed.
        Kept as one tuple, made into events when the file is written: this runs for every
        collective, the write only now and then."""
        sig = entry[flight.SIG]
        known = self._signatures.get(sig)
        if known is None:
            known = self._signatures[sig] = _about(sig, entry[flight.ALGORITHM])
        self._add((known, generation, entry[flight.SEQ], entry[flight.NBYTES],
                   entry[flight.OUTCOME], entry[flight.STARTED], entry[flight.ENDED],
                   entry[flight.WAITED]))
        if exc is not None:
            self.instant(type(exc).__name__, {"seq": entry[flight.SEQ], "error": str(exc)})

    def _expanded(self, record: tuple, shift: float) -> list[dict]:
        """A collective() record as its events: the span, and its kernel's phase."""
        (name, described, kernel), generation, seq, nbytes, outcome, began, ended, waited = \
            record
        ident, start, end = f"{generation}.{seq}", self.us(began) + shift, self.us(ended) + shift
        common = {"cat": "collective", "name": name, "id": ident, "pid": self.rank,
                  "tid": COLLECTIVES}
        events = [{"ph": "b", **common, "ts": start,
                   "args": {"seq": seq, "generation": generation, "bytes": nbytes,
                            "outcome": outcome, **described}}]
        if kernel is not None:
            phase = {**common, "name": kernel}
            events += [{"ph": "b", **phase, "ts": start, "args": {"waited for": waited}},
                       {"ph": "e", **phase, "ts": end}]
        return events + [{"ph": "e", **common, "ts": end, "args": {"outcome": outcome}}]

    def phase(self, seq: int, name: str, began_ns: int, ended_ns: int, args: dict,
              generation: int | None = None) -> None:
        """A phase of collective `seq` (waiting for a peer, sending, reducing, copying)."""
        ident = f"{self.generation if generation is None else generation}.{seq}"
        self._async_phase(ident, name, self.us(began_ns), self.us(ended_ns), args)

    generation = 0  # the ring's, which phases of the collectives running now belong to

    def _async_phase(self, ident: str, name: str, start: float, end: float, args: dict) -> None:
        self._add({"ph": "b", "cat": "collective", "name": name, "id": ident,
                   "pid": self.rank, "tid": COLLECTIVES, "ts": start, "args": args})
        self._add({"ph": "e", "cat": "collective", "name": name, "id": ident,
                   "pid": self.rank, "tid": COLLECTIVES, "ts": end})

    def span(self, name: str, tid: int, began_ns: int, ended_ns: int,
             args: dict | None = None) -> None:
        """A complete span on thread `tid` (a bucket's all-reduce, a stage's compute)."""
        start = self.us(began_ns)
        self._add({"ph": "X", "name": name, "pid": self.rank, "tid": tid, "ts": start,
                   "dur": self.us(ended_ns) - start, "args": args or {}})

    def instant(self, name: str, args: dict | None = None, tid: int = LINKS) -> None:
        """Something that happened at one moment (PeerLost, a re-form)."""
        self._add({"ph": "i", "s": "p", "name": name, "pid": self.rank, "tid": tid,
                   "ts": self.us(time.monotonic_ns()), "args": args or {}})

    def counter(self, name: str, value: float) -> None:
        """A value over time (micro-batches in flight)."""
        self._add({"ph": "C", "name": name, "pid": self.rank,
                   "ts": self.us(time.monotonic_ns()), "args": {name: value}})

    def flow(self, name: str, ident: str, start: bool, tid: int, at_ns: int) -> None:
        """One end of an arrow between ranks: from a sender's span (start) to the
        receiver's (the same `ident`)."""
        event = {"ph": "s" if start else "f", "cat": "flow", "name": name, "id": ident,
                 "pid": self.rank, "tid": tid, "ts": self.us(at_ns)}
        if not start:
            event["bp"] = "e"
        self._add(event)

    def write(self) -> None:
        """Write every kept event to the file, atomically."""
        with self._lock:
            count = self._count
            if count == self._written:
                return
            shift, kept = self.offset_us, list(self._events)
            events: list[dict] = []
            for e in kept:
                if type(e) is tuple:
                    events += self._expanded(e, shift)
                else:
                    events.append(dict(e, ts=e["ts"] + shift))
            rest = {"displayTimeUnit": "ms",
                    "otherData": {"rank": self.rank, "pid": os.getpid(), "clock": self.clock,
                                  "clock_offset_us": shift,
                                  "events_dropped": max(0, count - len(kept))}}
            temporary = f"{self.path}.{os.getpid()}.tmp"
            text = ('{"traceEvents":[' + ",".join(_encoded(self._names() + events)) + "],"
                    + _compact(rest)[1:])
            with open(temporary, "w") as out:
                out.write(text)
            os.replace(temporary, self.path)
            self._written = count

    def _names(self) -> list[dict]:
        names = [{"ph": "M", "name": "process_name", "pid": self.rank,
                  "args": {"name": f"rank {self.rank}"}},
                 {"ph": "M", "name": "process_sort_index", "pid": self.rank,
                  "args": {"sort_index": self.rank}}]
        return names + [{"ph": "M", "name": "thread_name", "pid": self.rank, "tid": tid,
                         "args": {"name": name}} for tid, name in THREADS.items()]

    def _flush_now_and_then(self) -> None:
        every = float(os.environ.get("RINGLIB_TIMELINE_FLUSH_S", FLUSH_S))
        while not self._stop.wait(every):
            self.write()

    def close(self) -> None:
        """Stop recording and write the file a last time."""
        self._stop.set()
        _live.discard(self)
        self.write()


def _compact(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))  # the C encoder: dump() is not


def _encoded(events: list[dict]) -> list[str]:
    """`events` as JSON array members, CHUNK at a time: the encoder holds the GIL for a
    whole call, and the ring's loop thread (its heartbeats) must get its turns meanwhile."""
    return [_compact(events[i:i + CHUNK])[1:-1] for i in range(0, len(events), CHUNK)]


def _about(sig: str, algorithm: str) -> tuple[str, dict, str | None]:
    """What a timeline writes of every collective of signature `sig`, worked out once:
    its span's name; its args by field (signature, dtype, shape, op, root, thread,
    algorithm); and the name of its one phase where a kernel runs it whole (compiled
    path, mesh), else None."""
    words = sig.split()
    described: dict[str, Any] = {"signature": sig}
    for word in words[1:]:
        if "[" in word:
            described["dtype"], described["shape"] = word.split("[")[0], "[" + word.split("[")[1]
        elif word.startswith("root="):
            described["root"] = int(word[5:])
        elif word.startswith("thread="):
            described["thread"] = word[7:]
        elif word in _OPS:
            described["op"] = word
        else:
            described["algorithm"] = word
    described.setdefault("algorithm", algorithm)
    kernel = None
    if described["algorithm"].startswith(("compiled", "mesh")):
        kernel = ("compiled kernel" if described["algorithm"].startswith("compiled")
                  else "mesh") + ": write, wait for the peers, reduce"
    return f"ringlib:{words[0]}", described, kernel


def write_all() -> None:
    """Write every live timeline (at exit, on SIGTERM)."""
    for timeline in list(_live):
        try:
            timeline.write()
        except OSError:
            pass
