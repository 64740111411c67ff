"""The sweep's table, nccl-tests style, with a time and a ratio per compared system.

Rows come from rank 0's JSON lines; the first result of a row is ringlib's (or the first
ringlib setting), the others are compared with it: `ringlib/gloo` is ringlib's median time
over Gloo's, so below 1 ringlib is faster.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .systems import BUS_FACTOR
from .timing import format_size

MIB = 1 << 20


@dataclass
class Result:
    label: str
    p50: float           # seconds per call
    p99: float
    peak_bytes: int | None

    def algbw(self, nbytes: int) -> float:
        """GB/s: the buffer's bytes over the median time (nccl-tests' algbw)."""
        return nbytes / self.p50 / 1e9


@dataclass
class Row:
    nbytes: int
    count: int
    iters: int
    algo: str
    results: list[Result]
    skipped: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_message(cls, m: dict[str, Any]) -> Row:
        return cls(m["bytes"], m["count"], m["iters"], m["algo"],
                   [Result(**r) for r in m["results"]], m.get("skipped", {}))

    def result(self, label: str) -> Result | None:
        return next((r for r in self.results if r.label == label), None)


@dataclass
class Table:
    collective: str
    dtype: str
    world: int
    labels: list[str]    # every column's system, the first one's nccl-tests columns first

    @property
    def bus_factor(self) -> float:
        return BUS_FACTOR[self.collective](self.world)

    def _columns(self) -> list[tuple[str, int]]:
        first = self.labels[0]
        cols = [("size", 9), ("count", 10), ("type", 8), ("iters", 6), ("p50 us", 10),
                ("p99 us", 10), ("algbw GB/s", 10), ("busbw GB/s", 10), ("+mem MiB", 8),
                ("algo", 14)]
        for label in self.labels[1:]:
            cols += [(f"{label} us", max(10, len(label) + 3)),
                     (f"{first}/{label}", max(8, len(first) + len(label) + 1))]
        return cols

    def busbw(self, result: Result, nbytes: int) -> float:
        """GB/s as nccl-tests' busbw: algbw times the collective's factor."""
        return result.algbw(nbytes) * self.bus_factor

    def header(self) -> str:
        head = " ".join(f"{name:>{width}}" for name, width in self._columns())
        return f"{head}\n{'-' * len(head)}"

    def line(self, row: Row) -> str:
        first = row.results[0]
        peak = "-" if first.peak_bytes is None else f"{first.peak_bytes / MIB:.1f}"
        values = [format_size(row.nbytes), row.count, self.dtype, row.iters,
                  f"{first.p50 * 1e6:.1f}", f"{first.p99 * 1e6:.1f}",
                  f"{first.algbw(row.nbytes):.3f}", f"{self.busbw(first, row.nbytes):.3f}",
                  peak, row.algo or "-"]
        for label in self.labels[1:]:
            other = row.result(label)
            values += (["-", "-"] if other is None else
                       [f"{other.p50 * 1e6:.1f}", f"{first.p50 / other.p50:.2f}"])
        return " ".join(f"{v:>{width}}" for v, (_, width) in zip(values, self._columns()))


def crossover_summary(rows: list[Row]) -> str:
    """Where the ring (second column) first beats doubling (first), and where else."""
    wins = [format_size(r.nbytes) for r in rows
            if len(r.results) > 1 and r.results[1].p50 < r.results[0].p50]
    if not wins:
        return "the ring never beat recursive doubling at these sizes"
    return f"the ring first beats recursive doubling at {wins[0]} (it wins at {', '.join(wins)})"


def ratio_summary(rows: list[Row], labels: list[str]) -> list[str]:
    """Per compared system, the median ratio over the sizes and its range."""
    lines = []
    for label in labels[1:]:
        ratios = sorted(r.results[0].p50 / o.p50 for r in rows if (o := r.result(label)))
        if ratios:
            lines.append(f"{labels[0]}/{label} time ratio: median {ratios[len(ratios) // 2]:.2f} "
                         f"over {len(ratios)} sizes ({ratios[0]:.2f}..{ratios[-1]:.2f})")
    return lines


def slower_summary(rows: list[Row], labels: list[str]) -> list[str]:
    """Where both of ringlib's APIs were timed ("ringlib" and "blocking"): per other
    system, the slower API's time over that system's, size by size."""
    if not {"ringlib", "blocking"} <= set(labels):
        return []
    lines = []
    for label in labels:
        if label in ("ringlib", "blocking"):
            continue
        ratios = [f"{format_size(r.nbytes)} {max(a.p50, b.p50) / o.p50:.2f}" for r in rows
                  if (a := r.result("ringlib")) and (b := r.result("blocking"))
                  and (o := r.result(label))]
        if ratios:
            lines.append(f"slower of ringlib and blocking / {label}: " + ", ".join(ratios))
    return lines
