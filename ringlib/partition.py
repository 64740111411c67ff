"""Chunk arithmetic for ring collectives: which elements each rank and each step handles.

Pure functions over element counts, with no buffers and no I/O, so that the collectives'
bookkeeping can be tested without sockets (in the manner of hivemind's partition.py).
"""

from __future__ import annotations


def chunk_bounds(n: int, parts: int) -> list[int]:
    """Offsets of `parts` contiguous chunks covering n elements: chunk i is [b[i], b[i+1]).

    Sizes differ by at most one element: the first n % parts chunks hold one extra.
    With n < parts the trailing chunks are empty, and n == 0 gives all-empty chunks.
    """
    if parts < 1:
        raise ValueError(f"cannot partition into {parts} parts; need at least 1")
    if n < 0:
        raise ValueError(f"cannot partition a negative element count ({n})")
    base, extra = divmod(n, parts)
    # Chunk i starts after i chunks of `base` plus one extra element for each of the
    # first min(i, extra) chunks.
    return [i * base + min(i, extra) for i in range(parts + 1)]


def chunk(n: int, parts: int, index: int) -> tuple[int, int]:
    """The [start, stop) element range of chunk `index` of `parts` over n elements."""
    if not 0 <= index < parts:
        raise ValueError(f"chunk index {index} out of range for {parts} parts")
    base, extra = divmod(n, parts)
    start = index * base + min(index, extra)
    return start, start + base + (index < extra)


def sub_chunks(start: int, stop: int, max_elems: int) -> list[tuple[int, int]]:
    """Split [start, stop) into the fewest balanced pieces of at most `max_elems` elements.

    These are the pipelining units of a ring step: sending piece k+1 overlaps reducing
    piece k. An empty range yields one empty piece, so every step still sends a message.
    """
    if max_elems < 1:
        raise ValueError(f"sub-chunk size must be at least 1 element, got {max_elems}")
    length = stop - start
    if length < 0:
        raise ValueError(f"range [{start}, {stop}) has negative length")
    pieces = max(1, -(-length // max_elems))
    bounds = chunk_bounds(length, pieces)
    return [(start + bounds[i], start + bounds[i + 1]) for i in range(pieces)]
