"""Peak memory a collective adds to its process, from Linux's own accounting.

The kernel's high-water mark of resident memory (VmHWM) can be reset to the current
resident size by writing 5 to /proc/self/clear_refs. Freed memory that the allocator keeps
would hide growth (reusing it raises no mark), so every arena is trimmed first: what the
calls then need beyond the resident size they start from shows in the mark.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
from pathlib import Path
from typing import Awaitable, Callable, Iterator

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_bytes(field: str) -> int:
    for line in _STATUS.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def _trim() -> None:
    gc.collect()
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except AttributeError:  # not glibc: nothing to trim
        pass


def supported() -> bool:
    """Whether this process can reset and read its peak resident size."""
    try:
        _CLEAR_REFS.write_text("5")
        return _status_bytes("VmHWM") > 0
    except (OSError, KeyError):
        return False


@contextlib.contextmanager
def peak_above_now() -> Iterator[Callable[[], int]]:
    """Yields a function that says by how many bytes the peak resident size of this
    process has risen, since the block began, above what it held then (threads and
    ZeroMQ's buffers included)."""
    _trim()
    base = _status_bytes("VmRSS")
    _CLEAR_REFS.write_text("5")
    yield lambda: max(0, _status_bytes("VmHWM") - base)


async def peak_growth(call: Callable[[], Awaitable[None]], times: int = 2) -> int:
    """Bytes by which `times` awaits of call() raise the peak resident size (above)."""
    with peak_above_now() as grown:
        for _ in range(times):
            await call()
        return grown()
