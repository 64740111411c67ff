"""ringlib's exception hierarchy: everything a user may catch derives from RingError.

The buffer and dtype errors also derive from the matching built-in (ValueError, TypeError),
so code written against numpy's conventions keeps working.
"""

from __future__ import annotations


class RingError(Exception):
    """Root of every error ringlib raises on purpose."""


class UnsupportedBuffer(RingError, TypeError):
    """An object of a kind ringlib cannot use as a buffer (a list, a str, ...)."""


class UnsupportedDtype(UnsupportedBuffer):
    """A buffer's dtype is not one the compiled core reduces, or two buffers' dtypes differ."""


class UnsupportedOp(RingError, ValueError):
    """An unknown reduction op, or an op that is undefined for the dtype (integer mean)."""


class InvalidBuffer(RingError, ValueError):
    """A buffer that cannot be used as is: non-contiguous, read-only, or of the wrong length."""
