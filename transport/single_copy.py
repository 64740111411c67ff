"""Single-copy reads of a same-host peer's memory, for large payloads (Linux CMA).

Through a shared-memory ring a large payload is copied twice: into the ring by the sender,
out of it (or reduced out of it) by the receiver, and on a machine whose memory bus is the
limit those copies are the cost of the collective. Instead, the sender of a large payload
publishes only where it lies (its address and length, as a record in the ring), and the
receiver reads it straight out of the sender's memory with process_vm_readv(2): one copy,
made by the kernel, into the destination itself or into a small buffer that the reduction
reads while it is still in cache. Open MPI's shared-memory transport does the same (CMA).

The sender must not change the buffer until the receiver has read it: send() returns a
`Released` tracker, done once the receiver has released the record (the ring's tail has
passed it), which the collective waits on before it overwrites or returns the buffer.

A peer may read another's memory only where the kernel allows it (same user, and ptrace
permitted: no Yama restriction, or a container that allows the call). Each receiver tries
once when it takes a link, reading the segment's nonce out of the sender's memory; where
that fails, large payloads go through the ring like all others.
"""

from __future__ import annotations

import ctypes
import os
from typing import Any

import numpy as np

from ringlib.errors import PeerLost, ProtocolError

_libc = ctypes.CDLL(None, use_errno=True)


class _IoVec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


_readv = getattr(_libc, "process_vm_readv", None)
if _readv is not None:
    _readv.restype = ctypes.c_ssize_t
    _readv.argtypes = [ctypes.c_int, ctypes.POINTER(_IoVec), ctypes.c_ulong,
                       ctypes.POINTER(_IoVec), ctypes.c_ulong, ctypes.c_ulong]


def read(pid: int, address: int, into: int, nbytes: int) -> None:
    """Copy `nbytes` at `address` in process `pid` to `into` in this one; OSError if the
    kernel refuses or the memory is gone (the process died or freed it)."""
    if _readv is None:
        raise OSError("process_vm_readv is not available here")
    done = 0
    while done < nbytes:  # the kernel may stop short at a page it cannot read
        local, remote = _IoVec(into + done, nbytes - done), _IoVec(address + done, nbytes - done)
        got = _readv(pid, ctypes.byref(local), 1, ctypes.byref(remote), 1, 0)
        if got <= 0:
            err = ctypes.get_errno()
            raise OSError(err, f"reading {nbytes} bytes of process {pid}: {os.strerror(err)}")
        done += got


def readable(pid: int, address: int, expected: int) -> bool:
    """Whether the 8-byte word at `address` in process `pid` can be read and holds
    `expected` (the probe a receiver runs once per link)."""
    word = np.zeros(1, np.uint64)
    try:
        read(pid, address, word.ctypes.data, 8)
    except OSError:
        return False
    return int(word[0]) == expected


class RemotePayload:
    """A received payload that is still in the sender's memory: read it with read_into()
    (or .bytes), then release() it, which lets the sender change its buffer."""

    __slots__ = ("_pid", "_address", "_nbytes", "_release", "_sender", "_bytes")

    def __init__(self, pid: int, address: int, nbytes: int, release: Any,
                 sender: tuple[int, str]) -> None:
        self._pid, self._address, self._nbytes, self._release = pid, address, nbytes, release
        self._sender = sender  # (rank, address), for errors
        self._bytes: bytes | None = None

    def __len__(self) -> int:
        return self._nbytes

    def read_into(self, out: np.ndarray, start: int = 0) -> None:
        """Fill the C-contiguous array `out` from byte `start` of the payload."""
        if start < 0 or start + out.nbytes > self._nbytes:
            raise ProtocolError(f"bytes {start}..{start + out.nbytes} of a {self._nbytes}-byte "
                                "payload")
        try:
            read(self._pid, self._address + start, out.ctypes.data, out.nbytes)
        except OSError as exc:  # the sender died, or broke its word and freed the buffer
            rank, address = self._sender
            raise PeerLost(f"cannot read a payload of rank {rank} ({address}) in its memory: "
                           f"{exc}", rank, address) from None

    @property
    def bytes(self) -> bytes:
        if self._bytes is None:
            out = np.empty(self._nbytes, np.uint8)
            self.read_into(out)
            self._bytes = out.tobytes()
        return self._bytes

    @property
    def buffer(self) -> memoryview:
        """A copy, read now: for code that wants the bytes of any payload."""
        return memoryview(self.bytes)

    def release(self) -> None:
        if self._release is not None:
            self._release()
            self._release = None


class Released:
    """The tracker of a payload published by address: done once the receiver released it
    (or can no longer read it: the link closed)."""

    __slots__ = ("_writer", "_end")

    def __init__(self, writer: Any, end: int) -> None:
        self._writer, self._end = writer, end

    @property
    def done(self) -> bool:
        return self._writer.released(self._end)
