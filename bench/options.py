"""Command-line helpers that several benchmarks share."""

from __future__ import annotations

import argparse
from typing import Callable, Sequence


def names_among(known: Sequence[str], what: str) -> Callable[[str], list[str]]:
    """An argparse type for a comma-separated list of `known` names (each once, in the
    order given); an unknown one is an error naming it as `what`, with the known ones."""
    def parse(text: str) -> list[str]:
        names = [n for n in text.split(",") if n]
        unknown = sorted(set(names) - set(known))
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown {what} {', '.join(unknown)}; "
                                             f"choose from {', '.join(known)}")
        return list(dict.fromkeys(names))
    return parse
