"""Pipelined ring broadcast: the root's buffer flows around the ring in pieces.

Cost (N ranks, S bytes, pieces of size G): N-2 + S/G piece latencies; every rank but the
last receives and sends S bytes once, so no link carries more than S. Each rank copies a
piece into its buffer and passes on the received frame unchanged (no copy, no tracker)
or, where there is no frame to pass on (shared memory), the piece it copied.
"""

from __future__ import annotations

import numpy as np

from .channel import Channel
from .ring_schedule import neighbours


async def ring_broadcast(ch: Channel, buf: np.ndarray, root: int) -> None:
    """Overwrite `buf` (a storage view) on every rank with the root's."""
    left, right = neighbours(ch.rank, ch.world_size)
    pieces = ch.pieces([0, buf.size], 0)
    if ch.rank == root:
        for k, (a, b) in enumerate(pieces):
            await ch.send(right, 0, k, buf[a:b], region=0)
        return
    for k, (a, b) in enumerate(pieces):
        piece, frame = await ch.recv(left, 0, k, b - a)
        await ch.copy(buf[a:b], piece)
        if right != root:
            await ch.forward(right, 0, k, frame, buf[a:b], region=0)
        ch.release(frame)
