"""The element types ringlib reduces, and how numpy arrays, torch tensors and raw byte
buffers become the flat storage arrays the compiled kernels take, without copying."""

from __future__ import annotations

import functools
import sys
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import InvalidBuffer, UnsupportedBuffer, UnsupportedDtype


@dataclass(frozen=True)
class DType:
    """One supported element type.

    storage: what the kernels see (half types travel as 16-bit integers, see kernels.py).
    arith: the numpy scalar type the kernels compute in, for floats; None for integers.
    pair_storage: a 32-bit type holding two elements, for kernels that go faster on pairs.
    """

    name: str
    storage: np.dtype
    arith: type | None = None
    pair_storage: np.dtype | None = None

    @property
    def itemsize(self) -> int:
        return self.storage.itemsize

    @property
    def is_float(self) -> bool:
        return self.arith is not None


_TABLE = [
    DType("float32", np.dtype(np.float32), np.float32),
    DType("float64", np.dtype(np.float64), np.float64),
    DType("float16", np.dtype(np.int16), np.float32),
    DType("bfloat16", np.dtype(np.uint16), np.float32, np.dtype(np.uint32)),
    DType("int8", np.dtype(np.int8)),
    DType("uint8", np.dtype(np.uint8)),
    DType("int32", np.dtype(np.int32)),
    DType("int64", np.dtype(np.int64)),
]
BY_NAME: dict[str, DType] = {d.name: d for d in _TABLE}
# Keyed by numpy dtype objects: looking up `arr.dtype` is ~50x faster than `arr.dtype.name`.
_BY_NUMPY: dict[np.dtype, DType] = {np.dtype(d.name): d for d in _TABLE if d.name != "bfloat16"}
SUPPORTED = ", ".join(BY_NAME)


def lookup(name: str) -> DType:
    """The DType called `name` (numpy's or torch's spelling), or raise UnsupportedDtype."""
    name = str(name).removeprefix("torch.")
    try:
        return BY_NAME[name]
    except KeyError:
        raise _unsupported(name) from None


def _unsupported(name: object) -> UnsupportedDtype:
    return UnsupportedDtype(f"dtype {name} is not supported; use one of {SUPPORTED}")


def is_tensor(x: Any) -> bool:
    """Whether x is a torch tensor, without importing torch when the caller has not."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def typed_storage(x: Any, what: str = "buffer") -> tuple[np.ndarray, DType]:
    """A flat storage view of a C-contiguous numpy array or CPU tensor, and its DType."""
    if is_tensor(x):
        return _tensor_storage(x, what)
    if not isinstance(x, np.ndarray):
        raise UnsupportedBuffer(f"{what} must be a numpy array or torch tensor, "
                                f"not {type(x).__name__}")
    dtype = _BY_NUMPY.get(x.dtype) or _by_name(x.dtype, what)
    if not x.flags.c_contiguous:
        raise InvalidBuffer(f"{what} of shape {x.shape} is not C-contiguous")
    return x.reshape(-1).view(dtype.storage), dtype


def _by_name(dtype: np.dtype, what: str) -> DType:
    """The DType of a numpy dtype that is not one of ours exactly: ml_dtypes' bfloat16 goes
    by its name; another byte order than this machine's would be reduced as garbage."""
    if not dtype.isnative:
        raise UnsupportedDtype(f"{what} is {dtype.name} in non-native byte order "
                               f"({dtype.str!r}); ringlib reduces native-endian buffers: pass "
                               f"x.astype(x.dtype.newbyteorder('='))")
    return lookup(dtype.name)


def _tensor_storage(t: Any, what: str) -> tuple[np.ndarray, DType]:
    entry = _torch_table().get(t.dtype)
    if entry is None:
        raise _unsupported(t.dtype)
    dtype, numpy_view = entry
    if t.device.type != "cpu":
        raise InvalidBuffer(f"{what} is on device {t.device}; ringlib reduces CPU tensors")
    if not t.is_contiguous():
        raise InvalidBuffer(f"{what} of shape {tuple(t.shape)} is not contiguous")
    if t.requires_grad:
        t = t.detach()
    if numpy_view is not None:
        t = t.view(numpy_view)
    return t.numpy().reshape(-1).view(dtype.storage), dtype


@functools.cache
def _torch_table() -> dict[Any, tuple[DType, Any]]:
    """torch dtype -> (DType, a same-width dtype numpy accepts, where torch's is not)."""
    torch = sys.modules["torch"]
    table = {getattr(torch, d.name): (d, None) for d in _TABLE}
    table[torch.float16] = (BY_NAME["float16"], torch.int16)
    table[torch.bfloat16] = (BY_NAME["bfloat16"], torch.int16)
    return table


def raw_storage(buf: Any, dtype: DType, what: str = "buffer") -> np.ndarray:
    """A read-only storage view of a bytes-like object (bytes, memoryview, zmq.Frame)."""
    try:
        view = memoryview(buf)
    except TypeError:
        raise UnsupportedBuffer(f"{what} must be an array, a tensor or a bytes-like object, "
                                f"not {type(buf).__name__}") from None
    if not view.c_contiguous:
        raise InvalidBuffer(f"{what} is not C-contiguous")
    if view.nbytes % dtype.itemsize:
        raise InvalidBuffer(f"{what} holds {view.nbytes} bytes, not a whole number of "
                            f"{dtype.name} elements ({dtype.itemsize} bytes each)")
    return np.frombuffer(view.cast("B"), dtype=dtype.storage)
