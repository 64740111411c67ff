"""`ringlib trace FILES...`: the ranks' timelines (timeline.py) merged into one trace for
Perfetto, and a summary of what they show.

The ranks' times are already on rank 0's clock, so merging is concatenation. The summary
gives, for each kind of collective, how many ran, their p50 and p99 time and their bytes;
and for each rank how long the others waited for it: in every collective, the rank that
started it last kept each other rank waiting from that rank's start to its own, so a rank
that is late (a slow data loader, a straggler host) stands out.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys

from ringlib.errors import InvalidArgument


def load(path: str) -> dict:
    """One rank's trace, or InvalidArgument saying why it is not one."""
    try:
        with open(path) as source:
            document = json.load(source)
    except OSError as exc:
        raise InvalidArgument(f"{path}: {exc.strerror}") from None
    except ValueError as exc:
        raise InvalidArgument(f"{path}: not a JSON trace ({exc})") from None
    if not isinstance(document, dict) or not isinstance(document.get("traceEvents"), list):
        raise InvalidArgument(f"{path}: no traceEvents: not a ringlib timeline")
    return document


def merge(documents: list[dict]) -> dict:
    """One trace of every rank's events."""
    events = [e for d in documents for e in d["traceEvents"]]
    return {"traceEvents": events, "displayTimeUnit": "ms",
            "otherData": {"ranks": [d.get("otherData", {}) for d in documents]}}


def collectives(events: list[dict]) -> list[dict]:
    """Every collective span, as {rank, name, key, start, duration, bytes}: its "b" and
    "e" events paired by id; key (generation, seq) is the same on every rank."""
    begun: dict[tuple, dict] = {}
    spans = []
    for event in events:
        if event.get("cat") != "collective" or not event.get("name", "").startswith("ringlib:"):
            continue
        where = (event["pid"], event["id"])
        if event["ph"] == "b":
            begun[where] = event
        elif event["ph"] == "e" and where in begun:
            start = begun.pop(where)
            args = start.get("args", {})
            spans.append({"rank": event["pid"], "name": event["name"][len("ringlib:"):],
                          "key": (args.get("generation", 0), args.get("seq", 0)),
                          "start": start["ts"], "duration": event["ts"] - start["ts"],
                          "bytes": args.get("bytes", 0)})
    return spans


def waited_for(spans: list[dict]) -> dict[int, float]:
    """For each rank, the microseconds the other ranks spent waiting for it to start the
    collectives it started last."""
    by_key: dict[tuple, list[dict]] = collections.defaultdict(list)
    for span in spans:
        by_key[span["key"]].append(span)
    waited: dict[int, float] = collections.defaultdict(float)
    for group in by_key.values():
        if len(group) < 2:
            continue
        last = max(group, key=lambda s: s["start"])
        waited[last["rank"]] += sum(last["start"] - s["start"] for s in group)
    for span in spans:
        waited.setdefault(span["rank"], 0.0)
    return dict(waited)


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def summary(events: list[dict]) -> str:
    """The table `ringlib trace` prints."""
    spans = collectives(events)
    if not spans:
        return "no collectives in these traces"
    kinds: dict[str, list[dict]] = collections.defaultdict(list)
    for span in spans:
        kinds[span["name"]].append(span)
    lines = [f"{'collective':<16}{'count':>8}{'p50 ms':>10}{'p99 ms':>10}{'MiB':>10}"]
    for name, group in sorted(kinds.items()):
        times = [s["duration"] / 1000 for s in group]
        mib = sum(s["bytes"] for s in group) / (1 << 20)
        lines.append(f"{name:<16}{len(group):>8}{_percentile(times, 0.5):>10.3f}"
                     f"{_percentile(times, 0.99):>10.3f}{mib:>10.2f}")
    waited = waited_for(spans)
    lines.append("")
    lines.append("the others waited for each rank (it started a collective last):")
    latest = max(waited, key=waited.get)
    for rank in sorted(waited):
        mark = "   <- the late rank" if rank == latest and waited[rank] > 0 else ""
        lines.append(f"  rank {rank:<4}{waited[rank] / 1000:>12.3f} ms{mark}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run `ringlib trace ARGV`; return the exit code."""
    p = argparse.ArgumentParser(prog="ringlib trace", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("files", nargs="+", metavar="FILE", help="the ranks' timelines")
    p.add_argument("-o", "--output", default="trace.json",
                   help="where the merged trace goes (default: %(default)s; - for none)")
    args = p.parse_args(argv)
    try:
        documents = [load(path) for path in args.files]
    except InvalidArgument as exc:
        print(f"ringlib trace: {exc}", file=sys.stderr)
        return 2
    merged = merge(documents)
    if args.output != "-":
        with open(args.output, "w") as out:
            json.dump(merged, out, separators=(",", ":"))
        print(f"merged {len(documents)} traces into {args.output} (open it at "
              "https://ui.perfetto.dev)")
    print(summary(merged["traceEvents"]))
    return 0
