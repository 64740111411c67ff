"""Which chunk each rank sends and receives at each step of the two ring phases.

Pure index arithmetic, so it can be checked without sockets (tests/test_ring_schedule.py
runs the schedule on symbolic data). Rank r sends to r+1 and receives from r-1, mod N.
"""

from __future__ import annotations


def reduce_scatter_chunks(rank: int, world_size: int, step: int) -> tuple[int, int]:
    """(chunk sent, chunk received and reduced) at `step` of the reduce-scatter phase.

    Shifted by one from the textbook schedule so that the chunk completed last, at step
    N-2, is chunk `rank` itself: at step s rank r sends chunk r-s-1, which it reduced at
    step s-1 (or its own data at s = 0), and reduces chunk r-s-2 from its left neighbour.
    """
    return (rank - step - 1) % world_size, (rank - step - 2) % world_size


def all_gather_chunks(rank: int, world_size: int, step: int) -> tuple[int, int]:
    """(chunk sent, chunk received) at `step` of the all-gather phase.

    Rank r starts by sending its own complete chunk r; at step s it passes on chunk r-s,
    received at step s-1, and receives chunk r-s-1. After N-1 steps it has every chunk.
    """
    return (rank - step) % world_size, (rank - step - 1) % world_size


def neighbours(rank: int, world_size: int) -> tuple[int, int]:
    """(left, right): the rank this one receives from and the rank it sends to."""
    return (rank - 1) % world_size, (rank + 1) % world_size
