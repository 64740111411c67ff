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


def _syscall(name: str) -> Any:
    call = getattr(_libc, name, None)
    if call is not None:
        call.restype = ctypes.c_ssize_t
        call.argtypes = [ctypes.c_int, ctypes.POINTER(_IoVec), ctypes.c_ulong,
                         ctypes.POINTER(_IoVec), ctypes.c_ulong, ctypes.c_ulong]
    return call


_CALLS = {"read": _syscall("process_vm_readv"), "write": _syscall("process_vm_writev")}


def read(pid: int, address: int, into: int, nbytes: int) -> None:
    """Copy `nbytes` at `address` in process `pid` to `into` in this one; OSError if the
    kernel refuses or the memory is gone (the process died or freed it)."""
    _transfer("read", pid, address, into, nbytes)


def write(pid: int, address: int, source: int, nbytes: int) -> None:
    """Copy `nbytes` at `source` in this process to `address` in process `pid`."""
    _transfer("write", pid, address, source, nbytes)


def _transfer(way: str, pid: int, address: int, local: int, nbytes: int) -> None:
    call = _CALLS[way]
    if call is None:
        raise OSError(f"process_vm_{way}v is not available here")
    done = 0
    while done < nbytes:  # the kernel may stop short at a page boundary
        here, there = _IoVec(local + done, nbytes - done), _IoVec(address + done, nbytes - done)
        moved = call(pid, ctypes.byref(here), 1, ctypes.byref(there), 1, 0)
        if moved <= 0:
            err = ctypes.get_errno()
            raise OSError(err, f"{way} of {nbytes} bytes of process {pid}: {os.strerror(err)}")
        done += moved


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
    """A received payload that is still in the sender's memory: read it with read_into(),
    then release() it, which lets the sender change its buffer. If the sender
    sent it `writable`, write_from() may also overwrite it there, until the release."""

    __slots__ = ("_pid", "_address", "_nbytes", "_release", "_sender", "writable")

    def __init__(self, pid: int, address: int, nbytes: int, release: Any,
                 sender: tuple[int, str], writable: bool = False) -> None:
        self._pid, self._address, self._nbytes, self._release = pid, address, nbytes, release
        self._sender = sender  # (rank, address), for errors
        self.writable = writable

    def __len__(self) -> int:
        return self._nbytes

    def read_into(self, out: np.ndarray, start: int = 0) -> None:
        """Fill the C-contiguous array `out` from byte `start` of the payload."""
        self._transfer(read, out, start)

    def write_from(self, src: np.ndarray, start: int = 0) -> None:
        """Overwrite the payload, from byte `start`, in the sender's memory with `src`."""
        if not self.writable:
            raise ProtocolError("the sender did not let this payload be written")
        self._transfer(write, src, start)

    def _transfer(self, how: Any, local: np.ndarray, start: int) -> None:
        if start < 0 or start + local.nbytes > self._nbytes or self._release is None:
            raise ProtocolError(f"bytes {start}..{start + local.nbytes} of a {self._nbytes}-"
                                "byte payload, or a released one")
        try:
            how(self._pid, self._address + start, local.ctypes.data, local.nbytes)
        except OSError as exc:  # the sender died, or broke its word and freed the buffer
            rank, address = self._sender
            raise PeerLost(f"cannot reach a payload of rank {rank} ({address}) in its "
                           f"memory: {exc}", rank, address) from None

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
