"""Side-by-side timing: alternate the contenders call by call so machine noise hits both."""

from __future__ import annotations

import statistics
import time
from typing import Callable


def interleaved_medians(contenders: list[Callable[[], object]], repeat: int) -> list[float]:
    """Median seconds per call of each contender, run in turn `repeat` times after a warm-up."""
    times: list[list[float]] = [[] for _ in contenders]
    for fn in contenders:
        fn()
    for _ in range(repeat):
        for fn, samples in zip(contenders, times):
            start = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - start)
    return [statistics.median(samples) for samples in times]


def repeat_for(nbytes: int, budget_s: float = 0.25) -> int:
    """A repeat count that keeps one measurement near `budget_s`, assuming ~10 GB/s."""
    return max(7, min(2000, int(budget_s * 10e9 / max(nbytes, 1024) / 3)))


def parse_size(text: str) -> int:
    """'1KiB', '64MiB', '8B' or a plain number of bytes."""
    units = {"GIB": 1 << 30, "MIB": 1 << 20, "KIB": 1 << 10, "B": 1}
    upper = text.strip().upper()
    for suffix, factor in units.items():
        if upper.endswith(suffix):
            return int(float(upper[: -len(suffix)]) * factor)
    return int(upper)


def format_size(nbytes: int) -> str:
    for suffix, factor in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if nbytes >= factor and nbytes % factor == 0:
            return f"{nbytes // factor} {suffix}"
    return f"{nbytes} B"
