"""Shared-memory links: messages between two peers on one host through a /dev/shm segment.

Loopback sockets copy every byte through the kernel twice and wake two threads per
message. Between peers on one host the sender instead copies a message into a segment
that both have mapped, a ring of records, and the receiver reads it in place: the compiled
core reduces straight out of it. A link is one-way; its segment belongs to the sender.

Segment layout (all counters are uint64 byte counts that only grow; position = count mod
capacity):

    word 0: nonce        word 1: capacity          (written once by the sender)
    word 8: head         end of the last record published          (the sender's)
    word 16: tail        end of the last record released in order  (the receiver's)
    word 24: asleep      1 while the receiver waits on its event loop (the receiver's)
    byte 4096 on: the ring of records, each 64-byte aligned:
        [header length u64 | SKIP | REMOTE | WRITABLE][payload length u64][msgpack header] pad
        [payload, or for REMOTE where it lies in the sender: address u64, length u64] pad

A record never wraps: where one would not fit before the end, a SKIP record fills the rest.
The receiver may release records out of order (a piece kept for a later collective); the
tail moves over released records only. When the ring is full the sender falls back to a
socket for that message, so a slow receiver costs speed, never a lost message or a hang.

Wake-ups: a receiver always polls its rings before it waits for a message, so a sender
need not wake it unless it waits already: then `asleep` is set, and the sender rings a
doorbell over a socket after publishing. The receiver sets the word and then polls once
more; the sender publishes and then reads the word. Each stores, then loads the other's
word with a fence between (ringlib.atomics), so at least one of them sees the other's
store, and no wake-up is lost.

Nothing stays in /dev/shm: the receiver unlinks the name as soon as it has mapped it; an
offer never accepted is unlinked by the sender, or by others: see segment_names.py.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import mmap
import os
import secrets
import struct
from typing import Any, Callable

import numpy as np

from ringlib import atomics
from ringlib.errors import ProtocolError

from .segment_names import DIRECTORY, PREFIX, segment_name, unlink
from .single_copy import Released, RemotePayload

log = logging.getLogger(__name__)

DATA_OFFSET = 4096
ALIGN = 64
NONCE, CAPACITY, HEAD, TAIL, ASLEEP = 0, 1, 8, 16, 24
SKIP = 1 << 63
REMOTE = 1 << 62    # the payload stays in the sender's memory (single_copy.py)
WRITABLE = 1 << 61  # ... and the receiver may write into it there
MAX_HEADER = 1024
_RECORD = struct.Struct("<QQ")  # a record's header length (or SKIP) and payload length


def _aligned(n: int) -> int:
    return (n + ALIGN - 1) & ~(ALIGN - 1)


def record_size(header_len: int, payload_len: int) -> int:
    """Bytes a record takes in the ring, padding included."""
    return _aligned(_aligned(_RECORD.size + header_len) + payload_len)


def _map(fd: int, size: int) -> tuple[mmap.mmap, np.ndarray, memoryview]:
    """The mapping, its control words, and its ring of records. Every page is mapped now
    (MAP_POPULATE), so that the ring costs its whole size from the start instead of
    growing as records first reach each page."""
    memory = mmap.mmap(fd, size, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE)
    words = np.frombuffer(memory, np.uint64, count=DATA_OFFSET // 8)
    return memory, words, memoryview(memory)[DATA_OFFSET:]


def _unmap(memory: mmap.mmap) -> None:
    """Unmap, unless arrays still view the memory: then the last of them does."""
    with contextlib.suppress(BufferError):
        memory.close()


class Writer:
    """The sending end: creates the segment and copies messages into its ring."""

    def __init__(self, job_name: str, rank: int, peer: int, capacity: int) -> None:
        self.capacity = _aligned(capacity)
        self.name = segment_name(job_name, rank, peer)
        self.nonce = int.from_bytes(secrets.token_bytes(8), "little") >> 1
        self.ready = False     # the receiver has mapped it
        self.named = True      # the name still exists in /dev/shm
        self.single_copy = False  # the receiver reads large payloads from this process
        path = os.path.join(DIRECTORY, self.name)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            # Blocks allocated now: where /dev/shm is too small this fails (ENOSPC), where
            # a bare ftruncate would map pages that SIGBUS once written.
            os.posix_fallocate(fd, 0, DATA_OFFSET + self.capacity)
            self._memory, self._words, self._view = _map(fd, DATA_OFFSET + self.capacity)
        except BaseException:
            os.unlink(path)
            raise
        finally:
            os.close(fd)
        self._words[CAPACITY] = self.capacity
        self._words[ASLEEP] = 1
        atomics.store(self._words, NONCE, self.nonce)
        self._head = 0
        self._tail = 0  # the receiver's tail as last read
        self.unread = False  # the receiver closed: it reads nothing more (SharedLinks.left)

    @property
    def probe(self) -> tuple[int, int]:
        """(pid, address) of the nonce in this process, for the receiver's single-copy probe."""
        return os.getpid(), self._words.ctypes.data + 8 * NONCE

    def accepted(self, single_copy: bool = False) -> None:
        """The receiver mapped the segment and unlinked its name."""
        self.ready, self.named, self.single_copy = True, False, single_copy

    def write(self, header: bytes, payload: Any, by_address: bool = False,
              writable: bool = False) -> tuple[bool, Released | None] | None:
        """Copy one message into the ring. None if it does not fit now (send it another way);
        else whether the receiver is asleep and needs a doorbell, and a tracker.

        With `by_address` (an ndarray payload), the record says only where the payload lies
        in this process, for the receiver to read it there (single_copy.py); the payload
        must not change until the tracker is done, and with `writable` the receiver may
        write into it meanwhile. Otherwise it is copied: no tracker.
        """
        if by_address:
            where = _RECORD.pack(payload.ctypes.data, payload.nbytes)
            flags = REMOTE | (WRITABLE if writable else 0)
            asleep = self._append(header, memoryview(where), flags)
            return None if asleep is None else (asleep, Released(self, self._head))
        view = None if payload is None else memoryview(payload).cast("B")
        asleep = self._append(header, view)
        return None if asleep is None else (asleep, None)

    def released(self, end: int) -> bool:
        """Whether the receiver released every record before byte count `end`, or the
        link or the receiver closed (nobody will read them)."""
        return self._words is None or self.unread or \
            int(atomics.load(self._words, TAIL)) >= end

    def _append(self, header: bytes, view: memoryview | None, flags: int = 0) -> bool | None:
        nbytes = 0 if view is None else view.nbytes
        if len(header) > MAX_HEADER:  # the reader would refuse it: let a socket carry it
            return None
        start = (_RECORD.size + len(header) + ALIGN - 1) & ~(ALIGN - 1)  # the payload's offset
        size = (start + nbytes + ALIGN - 1) & ~(ALIGN - 1)                # record_size()
        pos = self._head % self.capacity
        waste = self.capacity - pos if self.capacity - pos < size else 0
        if not self._room(waste + size):
            return None
        if waste:
            _RECORD.pack_into(self._view, pos, SKIP, 0)
            self._head += waste
            pos = 0
        _RECORD.pack_into(self._view, pos, len(header) | flags, nbytes)
        body = pos + _RECORD.size
        self._view[body:body + len(header)] = header
        if nbytes:
            self._view[pos + start:pos + start + nbytes] = view
        self._head += size
        return bool(atomics.store_then_load(self._words, HEAD, self._head, ASLEEP))

    @property
    def head(self) -> int:
        return self._head

    def _room(self, size: int) -> bool:
        if size > self.capacity:
            return False
        if self._head + size - self._tail > self.capacity:
            self._tail = int(atomics.load(self._words, TAIL))
        return self._head + size - self._tail <= self.capacity

    def close(self) -> None:
        """Unmap, and unlink the name if nobody took it."""
        self.ready = False
        if self.named:
            unlink(self.name)
            self.named = False
        self._words = self._view = None
        _unmap(self._memory)


class SharedPayload:
    """A received payload, read in place in the sender's segment until released. Like a
    zmq.Frame it has `.buffer` and a length; release() gives the space back. It is never
    sent on as it is (Channel.forward sends the copy it was read into)."""

    __slots__ = ("buffer", "_reader", "_entry")

    def __init__(self, buffer: memoryview, reader: Reader, entry: list) -> None:
        self.buffer, self._reader, self._entry = buffer, reader, entry

    def __len__(self) -> int:
        return self.buffer.nbytes

    def release(self) -> None:
        """The receiver is done with it: the sender may write over it. Idempotent."""
        if self._reader is not None:
            self._reader.release(self._entry)
            self._reader = None


HELD = (SharedPayload, RemotePayload)  # payloads that hold a place in a ring until released


def held(payload: Any) -> bool:
    """Whether a received payload is held in a ring or in its sender's memory until it is
    released (so it cannot be passed on as it is, as a ZeroMQ frame can)."""
    return isinstance(payload, HELD)


def discard(payload: Any) -> None:
    """Give back a payload nobody will read (a dropped or abandoned message)."""
    if isinstance(payload, HELD):
        payload.release()


class Reader:
    """The receiving end: maps the sender's segment and hands out its records in place."""

    def __init__(self, name: str, nonce: int, capacity: int,
                 deliver: Callable[[memoryview, Any], None], sender_pid: int = 0,
                 sender: tuple[int, str] = (-1, "")) -> None:
        if "/" in name or not name.startswith(PREFIX):
            raise ProtocolError(f"segment name {name!r} is not a ringlib segment")
        path = os.path.join(DIRECTORY, name)
        fd = os.open(path, os.O_RDWR)
        try:
            if os.fstat(fd).st_size != DATA_OFFSET + capacity:
                raise ProtocolError(f"segment {name} is not {capacity} bytes long")
            self._memory, self._words, self._view = _map(fd, DATA_OFFSET + capacity)
        finally:
            os.close(fd)
        if int(atomics.load(self._words, NONCE)) != nonce or self._words[CAPACITY] != capacity:
            _unmap(self._memory)
            raise ProtocolError(f"segment {name} holds another nonce or capacity")
        os.unlink(path)  # mapped on both ends: the name may go
        self.capacity = capacity
        self.sender_pid, self.sender = sender_pid, sender  # sender: (rank, address)
        self._deliver = deliver
        self._read = int(atomics.load(self._words, TAIL))
        self._pending: collections.deque[list] = collections.deque()  # [end, released]
        self.broken = False

    def poll(self) -> int:
        """Deliver every record published since the last poll; return how many."""
        if self.broken:
            return 0
        head, count = int(atomics.load(self._words, HEAD)), 0
        while self._read < head:
            try:
                self._take(head)
            except ProtocolError as exc:  # a ring out of step cannot be trusted any further
                log.warning("shared-memory link from rank %d (%s) broken: %s", *self.sender,
                            exc)
                self.broken = True
                return count
            count += 1
        return count

    def _take(self, head: int) -> None:
        pos = self._read % self.capacity
        header_len, payload_len = _RECORD.unpack_from(self._view, pos)
        remote, writable = header_len & REMOTE, bool(header_len & WRITABLE)
        header_len &= ~(REMOTE | WRITABLE)
        if header_len == SKIP:
            size = self.capacity - pos
        else:
            size = record_size(header_len, payload_len)
            if header_len > MAX_HEADER or pos + size > self.capacity:
                raise ProtocolError(f"record of {header_len} + {payload_len} bytes at {pos}")
        if self._read + size > head:
            raise ProtocolError(f"record at {pos} runs past the published end")
        self._read += size
        entry = [self._read, False]
        self._pending.append(entry)
        if header_len == SKIP:
            return self.release(entry)
        body = pos + _RECORD.size
        start = _aligned(body + header_len)
        if remote:
            if payload_len != _RECORD.size:
                raise ProtocolError(f"a remote payload's address takes {payload_len} bytes")
            address, nbytes = _RECORD.unpack_from(self._view, start)
            payload = RemotePayload(self.sender_pid, address, nbytes,
                                    lambda: self.release(entry), self.sender, writable)
        else:
            payload = SharedPayload(self._view[start:start + payload_len], self, entry)
        self._deliver(self._view[body:body + header_len], payload)

    def held(self) -> int:
        """Records delivered and not released yet."""
        return sum(not released for _, released in self._pending)

    def release(self, entry: list) -> None:
        entry[1] = True
        if self._words is None:
            return
        tail = None
        while self._pending and self._pending[0][1]:
            tail = self._pending.popleft()[0]
        if tail is not None:
            atomics.store(self._words, TAIL, tail)

    def awake(self) -> None:
        """This end is not waiting: it polls the ring before it does, and senders need not
        ring."""
        if not self.broken:
            atomics.store(self._words, ASLEEP, 0)

    def asleep(self) -> None:
        """This end waits for a message: senders ring from now on. Poll once more after."""
        if not self.broken:
            atomics.store_then_load(self._words, ASLEEP, 1, HEAD)

    def close(self) -> None:
        """Unmap; payloads still held keep their pages until they are dropped."""
        self.broken = True
        self._words = self._view = None
        _unmap(self._memory)
