"""The ring schedule on symbolic data: which contributions each chunk holds after each step."""

from __future__ import annotations

import pytest

from ringlib.collectives.ring_schedule import all_gather_chunks, neighbours, reduce_scatter_chunks


def run_schedule(world: int) -> list[list[frozenset[int]]]:
    """Every rank's chunks as the set of ranks whose data they hold, after both phases."""
    held = [[frozenset({r}) for _ in range(world)] for r in range(world)]
    for step in range(world - 1):
        sent = [held[r][reduce_scatter_chunks(r, world, step)[0]] for r in range(world)]
        for r in range(world):
            left = neighbours(r, world)[0]
            c = reduce_scatter_chunks(r, world, step)[1]
            assert c == reduce_scatter_chunks(left, world, step)[0], "sender and receiver disagree"
            held[r][c] = held[r][c] | sent[left]
    for r in range(world):
        assert held[r][r] == frozenset(range(world)), f"rank {r}'s own chunk is incomplete"
    for step in range(world - 1):
        sent = [held[r][all_gather_chunks(r, world, step)[0]] for r in range(world)]
        for r in range(world):
            left = neighbours(r, world)[0]
            c = all_gather_chunks(r, world, step)[1]
            assert c == all_gather_chunks(left, world, step)[0]
            held[r][c] = sent[left]
    return held


@pytest.mark.parametrize("world", range(1, 9))
def test_the_ring_leaves_every_chunk_complete_on_every_rank(world):
    everyone = frozenset(range(world))
    assert all(chunk == everyone for rank in run_schedule(world) for chunk in rank)


@pytest.mark.parametrize("world", range(2, 9))
def test_each_chunk_is_reduced_once_per_rank_and_never_after_it_is_sent(world):
    for r in range(world):
        reduced = [reduce_scatter_chunks(r, world, s)[1] for s in range(world - 1)]
        sent = [reduce_scatter_chunks(r, world, s)[0] for s in range(world - 1)]
        assert len(set(reduced)) == world - 1
        for s, c in enumerate(sent):
            assert c not in reduced[s:], f"rank {r} sends chunk {c} at step {s}, then reduces it"
