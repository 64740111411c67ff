"""The arena: one /dev/shm segment that every rank of a ring on one host maps, for the
compiled collectives (ringlib/arena_kernels.py, collectives/compiled.py).

Rank 0 creates it; the others map it by the name and nonce it sends them, and it is
unlinked as soon as every rank has answered (runtime/arena_meeting.py), so nothing stays
in /dev/shm. Its name follows segment_names.py, so the offers of a rank killed before the
unlink are removed as its shared-memory links' are.

Layout: a page of header (word 0 nonce, word 1 ranks, word 2 slot capacity in bytes), the
control words (arena_kernels.WORDS int64 per rank), then the slots: per rank, two of
`capacity` bytes each, 64-byte aligned.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import secrets

import numpy as np

from ringlib import atomics
from ringlib.arena_kernels import WORDS
from ringlib.errors import ProtocolError

from .segment_names import DIRECTORY, segment_name, unlink

HEADER = 4096
NONCE, RANKS, CAPACITY = 0, 1, 2
SLOTS = 2


def _control_bytes(ranks: int) -> int:
    return (ranks * WORDS * 8 + 4095) & ~4095


def arena_bytes(ranks: int, capacity: int) -> int:
    """The size of an arena of `ranks` ranks with slots of `capacity` bytes."""
    return HEADER + _control_bytes(ranks) + ranks * SLOTS * capacity


class Arena:
    """One rank's mapping of a ring's arena."""

    def __init__(self, fd: int, name: str, ranks: int, capacity: int) -> None:
        self.name, self.ranks, self.capacity = name, ranks, capacity
        self._memory = mmap.mmap(fd, arena_bytes(ranks, capacity),
                                 flags=mmap.MAP_SHARED | mmap.MAP_POPULATE)
        self.header = np.frombuffer(self._memory, np.int64, count=HEADER // 8)
        self.ctrl = np.frombuffer(self._memory, np.int64, count=ranks * WORDS, offset=HEADER)
        self._data = np.frombuffer(self._memory, np.uint8, offset=HEADER + _control_bytes(ranks))
        self._typed: dict[np.dtype, np.ndarray] = {}
        self.named = True

    @classmethod
    def create(cls, job: str, ranks: int, capacity: int) -> Arena:
        """Rank 0's: a new segment for `ranks` ranks with slots of `capacity` bytes (a
        multiple of 64). OSError where /dev/shm cannot hold it."""
        name = segment_name(job, 0, "arena")
        path = os.path.join(DIRECTORY, name)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            # Blocks allocated now: on a small /dev/shm this fails here (ENOSPC) instead of
            # a SIGBUS at the first write into an unbacked page.
            os.posix_fallocate(fd, 0, arena_bytes(ranks, capacity))
            arena = cls(fd, name, ranks, capacity)
        except BaseException:
            os.unlink(path)
            raise
        finally:
            os.close(fd)
        arena.header[RANKS], arena.header[CAPACITY] = ranks, capacity
        arena.nonce = int.from_bytes(secrets.token_bytes(8), "little") >> 1
        atomics.store(arena.header, NONCE, arena.nonce)
        return arena

    @classmethod
    def open(cls, name: str, nonce: int, ranks: int, capacity: int) -> Arena:
        """Another rank's: map rank 0's segment, which must hold `nonce` (a segment of
        the same name on another host's /dev/shm does not). OSError or ProtocolError."""
        if "/" in name or not name.startswith("ringlib-"):
            raise ProtocolError(f"arena name {name!r} is not a ringlib segment")
        fd = os.open(os.path.join(DIRECTORY, name), os.O_RDWR)
        try:
            if os.fstat(fd).st_size != arena_bytes(ranks, capacity):
                raise ProtocolError(f"arena {name} is not {arena_bytes(ranks, capacity)} bytes")
            arena = cls(fd, name, ranks, capacity)
            arena.named = False  # rank 0's name: rank 0 unlinks it
        finally:
            os.close(fd)
        if int(atomics.load(arena.header, NONCE)) != nonce or \
                arena.header[RANKS] != ranks or arena.header[CAPACITY] != capacity:
            arena.close()
            raise ProtocolError(f"arena {name} holds another nonce or shape")
        arena.nonce = nonce
        return arena

    def slots(self, storage: np.dtype) -> np.ndarray:
        """The slots as (ranks, 2, elements) of `storage`, made once per type."""
        view = self._typed.get(storage)
        if view is None:
            elems = self.capacity // storage.itemsize
            view = self._typed[storage] = self._data[:self.ranks * SLOTS * self.capacity] \
                .view(storage).reshape(self.ranks, SLOTS, elems)
        return view

    def unlink(self) -> None:
        """Remove the name (rank 0, once every rank has mapped it or given up)."""
        if self.named:
            unlink(self.name)
            self.named = False

    def close(self) -> None:
        """Unmap (and unlink if still named); views still held keep their pages."""
        self.unlink()
        self._typed.clear()
        self.header = self.ctrl = self._data = None
        with contextlib.suppress(BufferError):
            self._memory.close()
