"""Chunk arithmetic: balanced chunks per rank and sub-chunks per pipelined step."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ringlib import chunk, chunk_bounds, sub_chunks


@given(n=st.integers(0, 10**9), parts=st.integers(1, 1024))
def test_chunks_cover_n_in_order_and_differ_by_at_most_one(n, parts):
    bounds = chunk_bounds(n, parts)
    sizes = [hi - lo for lo, hi in zip(bounds, bounds[1:])]
    assert bounds[0] == 0 and bounds[-1] == n and len(sizes) == parts
    assert max(sizes) - min(sizes) <= 1
    assert sizes == sorted(sizes, reverse=True)  # the larger chunks come first
    assert [chunk(n, parts, i) for i in range(parts)] == list(zip(bounds, bounds[1:]))


@pytest.mark.parametrize("n, parts, expected", [
    (0, 3, [0, 0, 0, 0]),
    (2, 5, [0, 1, 2, 2, 2, 2]),
    (10, 3, [0, 4, 7, 10]),
    (7, 1, [0, 7]),
])
def test_chunk_bounds_examples(n, parts, expected):
    assert chunk_bounds(n, parts) == expected


@given(start=st.integers(0, 10**6), length=st.integers(0, 10**6), max_elems=st.integers(1, 10**5))
def test_sub_chunks_are_the_fewest_balanced_pieces_within_the_limit(start, length, max_elems):
    pieces = sub_chunks(start, start + length, max_elems)
    assert pieces[0][0] == start and pieces[-1][1] == start + length
    assert all(a[1] == b[0] for a, b in zip(pieces, pieces[1:]))
    sizes = [hi - lo for lo, hi in pieces]
    assert max(sizes) <= max_elems
    assert len(pieces) == max(1, -(-length // max_elems))
    assert max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize("call, words", [
    (lambda: chunk_bounds(5, 0), "at least 1"),
    (lambda: chunk_bounds(-1, 2), "negative element count"),
    (lambda: chunk(5, 2, 2), "out of range"),
    (lambda: sub_chunks(0, 10, 0), "at least 1 element"),
    (lambda: sub_chunks(5, 4, 2), "negative length"),
])
def test_bad_arguments_are_clear_errors(call, words):
    with pytest.raises(ValueError, match=words):
        call()
