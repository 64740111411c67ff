"""How the ranks of a ring come to share an arena (transport/arena.py), or agree not to.

Right after start-up (and after reform) every rank of a ring of two or more calls meet().
Where a rank's shared-memory links do not reach every peer (a rank on another host, a
rank with shared memory off, an inproc ring), no rank's do, and none meets: the ring
takes messages, as before. Otherwise meet() runs two small collectives on the message
path, in which every rank takes part whatever its own settings: rank 0 creates the arena
and broadcasts its name, nonce and slot capacity; each other rank maps it (or declines,
with the compiled path off); then a minimum over the ranks says whether all did. Only
then does any rank run collectives over it, so ranks never disagree about it. Rank 0
unlinks the name once every rank has answered.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import numpy as np

from ringlib.errors import ProtocolError
from ringlib.transport.arena import Arena
from ringlib.transport.segment_names import job

from .settings import Settings

if TYPE_CHECKING:
    from .ring import Ring

log = logging.getLogger(__name__)

CARD_BYTES = 256  # rank 0's word to the others: nonce, capacity, name
MIN_SLOT_BYTES = 64 << 10  # the smallest slot worth an arena: the size the split starts at


async def meet(ring: Ring, settings: Settings) -> Arena | None:
    """The arena every rank of `ring` mapped, or None (on every rank alike)."""
    if not ring.endpoint.shares_memory_with_all():
        return None
    wanted = settings.compiled_bytes > 0
    card = np.zeros(CARD_BYTES, np.uint8)
    arena = None
    try:
        if ring.rank == 0 and wanted:
            arena = _create(ring, settings.compiled_bytes)
            if arena is not None:
                _write_card(card, arena)
        await ring.broadcast(card, root=0)
        if ring.rank != 0 and wanted:
            arena = _open(ring, card)
        mapped = np.array([arena is not None], np.int64)
        await ring.all_reduce(mapped, "min")
    except BaseException:
        if arena is not None:
            arena.close()
        raise
    if arena is not None:
        arena.unlink()
        if not mapped[0]:
            arena.close()
            arena = None
    return arena


def _create(ring: Ring, capacity: int) -> Arena | None:
    """An arena with slots of `capacity` bytes, or of half as many, and so on down to
    MIN_SLOT_BYTES, where /dev/shm is too small (Docker gives 64 MiB): the larger
    collectives then take messages."""
    capacity = (capacity + 63) & ~63
    while True:
        try:
            return Arena.create(job(ring.peers), ring.world_size, capacity)
        except OSError as exc:
            if capacity // 2 < MIN_SLOT_BYTES:
                log.info("rank 0 (%s) makes no shared arena: %s", ring.address, exc)
                return None
            capacity //= 2


def _write_card(card: np.ndarray, arena: Arena) -> None:
    name = arena.name.encode()
    card[:16] = np.array([arena.nonce, arena.capacity], np.int64).view(np.uint8)
    card[16:16 + len(name)] = np.frombuffer(name, np.uint8)


def _open(ring: Ring, card: np.ndarray) -> Arena | None:
    nonce, capacity = (int(v) for v in card[:16].view(np.int64))
    if capacity == 0:
        return None  # rank 0 made none
    name = card[16:].tobytes().rstrip(b"\0").decode(errors="replace")
    try:
        return Arena.open(name, nonce, ring.world_size, capacity)
    except (OSError, ProtocolError) as exc:  # another host's /dev/shm, most often
        log.info("rank %d (%s) cannot map the shared arena: %s", ring.rank, ring.address, exc)
        return None
