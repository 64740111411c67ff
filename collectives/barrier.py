"""Dissemination barrier (Hensgen, Finkel and Manber): no rank leaves before all arrived.

Cost (N ranks): ceil(log2 N) steps of one empty message each; in step i rank r notifies
r + 2^i and waits for r - 2^i, so after the last step every rank has heard, through some
chain, from every other.
"""

from __future__ import annotations

import numpy as np

from .channel import Channel

_EMPTY = np.empty(0, np.uint8)


async def dissemination_barrier(ch: Channel) -> None:
    n, r = ch.world_size, ch.rank
    distance, step = 1, 0
    while distance < n:
        await ch.send((r + distance) % n, step, 0, _EMPTY)
        await ch.recv((r - distance) % n, step, 0, 0)
        distance, step = distance * 2, step + 1
