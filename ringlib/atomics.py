"""Ordered loads and stores on words that two processes share (transport/shared.py).

A writer fills a record, then publishes it by storing a counter; the reader loads the
counter, then reads the record. Python gives no ordering between such accesses, and x86
itself may let a load pass an earlier store (store buffering), which is the one reordering
a "store my flag, then check yours" handshake cannot survive. These compiled functions
put LLVM sequentially consistent fences around each access (`mfence` on x86, `dmb` on
Arm), and a compiled `words[i] = v` is one aligned 8-byte store, which no reader sees
torn. Pure functions of a uint64 array, with no I/O, like the kernels.
"""

from __future__ import annotations

from numba import njit, types
from numba.extending import intrinsic

_JIT = dict(nogil=True, cache=True, boundscheck=False)


@intrinsic
def _fence(typingctx):
    """A sequentially consistent fence: no load or store crosses it either way."""

    def codegen(context, builder, signature, args):
        builder.fence("seq_cst")
        return context.get_dummy_value()

    return types.none(), codegen


@njit(**_JIT)
def load(words, i):
    """words[i], read after every access before it and before every access after it."""
    _fence()
    value = words[i]
    _fence()
    return value


@njit(**_JIT)
def store(words, i, value):
    """words[i] = value, visible only after every access before it."""
    _fence()
    words[i] = value
    _fence()


@njit(**_JIT)
def store_then_load(words, i, value, j):
    """Store words[i] = value, then load words[j] with no reordering between the two:
    the half of a handshake that each side runs with i and j swapped."""
    _fence()
    words[i] = value
    _fence()
    return words[j]
