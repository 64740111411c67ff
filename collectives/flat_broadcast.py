"""Flat broadcast, for small buffers: the root sends its buffer to every other rank.

Cost (N ranks, S bytes): one step of latency; the root sends (N-1) x S bytes, which is
cheap while S is small, and every other rank receives S once.
"""

from __future__ import annotations

import numpy as np

from .channel import Channel


async def flat_broadcast(ch: Channel, buf: np.ndarray, root: int) -> None:
    """Overwrite `buf` (a storage view) on every rank with the root's."""
    if ch.rank != root:
        piece, _ = await ch.recv(root, 0, 0, buf.size)
        await ch.copy(buf, piece)
        return
    for to in range(ch.world_size):
        if to != root:
            await ch.send(to, 0, 0, buf, region=0)
