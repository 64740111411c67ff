"""Side-by-side timing: alternate the contenders call by call so machine noise hits both."""

from __future__ import annotations

import argparse
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


def parse_size_list(text: str) -> list[int]:
    """'256KiB,1MiB' as byte counts, for argparse."""
    return _parse_list(text, parse_size, "sizes")


def parse_int_list(text: str) -> list[int]:
    """'0,100,300' as integers, for argparse."""
    return _parse_list(text, int, "integers")


def _parse_list(text: str, parse: Callable[[str], int], what: str) -> list[int]:
    try:
        values = [parse(s) for s in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad {what} {text!r}") from None
    if min(values) < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: {what} must not be negative")
    return values


def parse_sizes(text: str) -> list[int]:
    """'8B:64MiB:4' (8 B, then 4x each time, and 64 MiB last even if the factor misses it;
    the factor defaults to 2) or a comma list '8B,1MiB'."""
    if ":" not in text:
        return parse_size_list(text)
    try:
        start, stop, *factor = text.split(":")
        low, high, step = parse_size(start), parse_size(stop), int(factor[0]) if factor else 2
    except (ValueError, IndexError):
        raise argparse.ArgumentTypeError(f"bad sizes {text!r}") from None
    if low < 1 or high < low or step < 2 or len(factor) > 1:
        raise argparse.ArgumentTypeError(f"{text!r}: want START:STOP[:FACTOR], "
                                         "1 <= START <= STOP, FACTOR >= 2")
    sizes = [low]
    while sizes[-1] * step <= high:
        sizes.append(sizes[-1] * step)
    return sizes if sizes[-1] == high else [*sizes, high]
