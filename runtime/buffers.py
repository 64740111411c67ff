"""The caller's arrays and tensors, as storage views the collectives take, and back.

Every check happens here, on the calling rank, before any message is sent.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np

from ringlib.dtypes import DType, is_tensor, typed_storage
from ringlib.errors import InvalidBuffer


def storage(x: Any, what: str, writable: bool) -> tuple[np.ndarray, DType]:
    """The flat storage view of x and its DType; InvalidBuffer if it must be written but cannot."""
    view, dtype = typed_storage(x, what)
    if writable and not view.flags.writeable:
        raise InvalidBuffer(f"{what} is read-only, but the collective writes its result into it")
    return view, dtype


def empty_like(x: Any, shape: tuple[int, ...]) -> tuple[Any, np.ndarray]:
    """A new array or tensor of x's kind and dtype with `shape`, and its storage view."""
    if is_tensor(x):
        out = sys.modules["torch"].empty(shape, dtype=x.dtype)
    else:
        out = np.empty(shape, dtype=x.dtype)
    return out, typed_storage(out, "output")[0]


def like(x: Any, view: np.ndarray) -> Any:
    """A 1-D array or tensor of x's kind and dtype holding a copy of storage `view`."""
    data = view.copy()
    if is_tensor(x):
        return sys.modules["torch"].from_numpy(data).view(x.dtype)
    return data.view(x.dtype)


def flat_view(x: Any, as_type: np.dtype, writable: bool) -> np.ndarray:
    """x's flat storage seen as `as_type`, for a buffer whose dtype was checked before
    (the compiled path's later calls of one signature): a numpy array costs a reshape."""
    flags = x.flags if type(x) is np.ndarray else None
    if flags is not None and flags.c_contiguous and (flags.writeable or not writable):
        flat = x.reshape(-1)
        return flat if flat.dtype == as_type else flat.view(as_type)
    return storage(x, "x", writable)[0].view(as_type)
