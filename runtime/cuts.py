"""Where a graph run in one node order is cut into stages, and what crosses each cut.

A stage is a run of consecutive nodes; a cut is the index of the node that starts the
next stage. At a cut, every value made before it and still used at or after it crosses:
the activations of the stage just before, and skip connections that the stages in
between carry along. This is index arithmetic, with no torch or ONNX in it, shared by
the torch.fx splitter (traced_splitting.py) and the ONNX one (onnx_splitting.py).
"""

from __future__ import annotations

from typing import Hashable, Iterable, Mapping, Sequence, TypeVar

from ringlib.errors import InvalidArgument

V = TypeVar("V", bound=Hashable)
SHOWN_NAMES = 8  # valid names an error message lists


def cut_indices(points: Sequence[str], starts: Mapping[str, int]) -> list[int]:
    """The cut each named point makes (`starts`: name -> the index of its first node),
    checked: every name known, the points in node order, and no stage left empty."""
    cuts: list[int] = []
    for k, point in enumerate(points):
        if point not in starts:
            raise InvalidArgument(f"unknown split point {point!r}; valid names include "
                                  f"{few(starts)}")
        cut = starts[point]
        if cut == 0:
            raise InvalidArgument(f"split point {point!r} is the first node, so the first "
                                  "stage would be empty")
        if cuts and cut == cuts[-1]:
            raise InvalidArgument(f"split points {points[k - 1]!r} and {point!r} start at "
                                  "the same node, so the stage between them would be empty")
        if cuts and cut < cuts[-1]:
            raise InvalidArgument(f"split point {point!r} runs before {points[k - 1]!r}; "
                                  "give the points in the order the model runs them")
        cuts.append(cut)
    return cuts


def crossing_values(made: Mapping[V, int], used: Mapping[V, Iterable[int]],
                    cuts: Sequence[int]) -> list[list[V]]:
    """For each cut, the values made before it and used at or after it, in the order made.

    made: the index of each value's node (-1 for the graph's inputs); used: the indices of
    the nodes that use it, the graph's output counting as the node after the last.
    """
    last = _last_uses(made, used)
    order = sorted(made, key=made.__getitem__)  # stable: ties keep the order of `made`
    return [[v for v in order if made[v] < cut <= last[v]] for cut in cuts]


def open_cuts(made: Mapping[V, int], used: Mapping[V, Iterable[int]], count: int,
              blocking: Iterable[V]) -> list[int]:
    """The cuts 1..count-1 of `count` nodes that no `blocking` value crosses."""
    last = _last_uses(made, used)
    # A value made at m and last used at u crosses the cuts m+1..u: count, for every cut,
    # the blocking values whose span covers it, by +1 at m+1 and -1 after u.
    steps = [0] * (count + 2)
    for v in blocking:
        if made[v] < last[v]:
            steps[made[v] + 1] += 1
            steps[last[v] + 1] -= 1
    covering, cuts = 0, []
    for cut in range(count):
        covering += steps[cut]
        if cut and not covering:
            cuts.append(cut)
    return cuts


def _last_uses(made: Mapping[V, int], used: Mapping[V, Iterable[int]]) -> dict[V, int]:
    """Each value's last use: where it is made, if nothing uses it."""
    return {v: max(used.get(v, ()), default=m) for v, m in made.items()}


def few(names: Iterable[str]) -> str:
    """The first SHOWN_NAMES of `names`, quoted, and how many there are in all."""
    names = list(names)
    shown = ", ".join(repr(name) for name in names[:SHOWN_NAMES])
    return shown + (f", ... ({len(names)} in all)" if len(names) > SHOWN_NAMES else "")
