"""reduce_into: the public entry to the compiled kernels, with the checks done up front."""

from __future__ import annotations

import functools
from typing import Any, Callable, TypeVar

import numpy as np

from . import kernels
from .dtypes import DType, is_tensor, raw_storage, typed_storage
from .errors import InvalidBuffer, UnsupportedDtype, UnsupportedOp
from .ops import Op

Buffer = TypeVar("Buffer")

_KERNELS = {
    Op.SUM: kernels.sum_into,
    Op.PROD: kernels.prod_into,
    Op.MIN: kernels.min_into,
    Op.MAX: kernels.max_into,
    Op.MEAN: kernels.mean_into,
}


def reduce_into(dst: Buffer, src: Any, op: Op | str = Op.SUM, *, count: int = 2) -> Buffer:
    """Reduce `src` into `dst` element-wise, in place, and return `dst`.

    dst: a writable, C-contiguous numpy array or CPU torch tensor of a supported dtype
        (float32, float64, float16, bfloat16, int8, uint8, int32, int64).
    src: an array or tensor of the same dtype and size, or a bytes-like object (bytes,
        memoryview, a zmq.Frame) holding exactly as many elements of dst's dtype; it is
        read in place, never copied.
    op: "sum", "prod", "min", "max" or "mean" (or an Op). Integer overflow wraps, as in
        numpy; min and max propagate NaN. Half types compute in float32 and round once.
    count: for "mean", the number of contributions dst + src sums up; the result is
        (dst + src) / count. The default 2 gives the mean of the two.

    Raises UnsupportedBuffer / UnsupportedDtype (TypeErrors) or InvalidBuffer /
    UnsupportedOp (ValueErrors) before touching any data.
    """
    op = Op.parse(op)
    out, dtype = typed_storage(dst, "dst")
    if not out.flags.writeable:
        raise InvalidBuffer("dst is read-only; reduce_into writes its result into dst")
    source = _source_storage(src, dtype)
    if source.size != out.size:
        raise InvalidBuffer(f"src has {source.size} elements but dst has {out.size}")
    extra = _mean_divisor(dtype, count) if op is Op.MEAN else ()
    _launch(_KERNELS[op], out, source, dtype, extra)
    return dst


def storage_reducer(dtype: DType, op: Op | str, count: int = 2) -> Callable[[np.ndarray, np.ndarray], None]:
    """`reducer(out, src)` over storage views (see dtypes.typed_storage) of `dtype`, for
    callers that checked their buffers once and reduce many pieces of them: the collectives.

    Raises UnsupportedOp up front where the op is undefined for the dtype (integer mean).
    """
    op = Op.parse(op)
    extra = _mean_divisor(dtype, count) if op is Op.MEAN else ()
    return functools.partial(_launch, _KERNELS[op], dtype=dtype, extra=extra)


def _source_storage(src: Any, dtype: DType) -> np.ndarray:
    if isinstance(src, np.ndarray) or is_tensor(src):
        source, src_dtype = typed_storage(src, "src")
        if src_dtype is not dtype:
            raise UnsupportedDtype(f"src dtype {src_dtype.name} differs from dst dtype "
                                   f"{dtype.name}")
        return source
    return raw_storage(src, dtype, "src")


def _mean_divisor(dtype: DType, count: int) -> tuple[Any]:
    if not dtype.is_float:
        raise UnsupportedOp(f"mean is undefined for integer dtype {dtype.name}; "
                            "use sum and divide, or convert to a float dtype")
    if int(count) != count or count < 1:
        raise UnsupportedOp(f"mean needs a positive whole count of contributions, got {count}")
    return (dtype.arith(count),)


def _launch(kernel: Any, out: np.ndarray, src: np.ndarray, dtype: DType, extra: tuple) -> None:
    """Run `kernel` over all elements: on pairs of elements where the dtype has a faster
    pair storage (bfloat16), then on a last odd element alone."""
    n = out.size
    if dtype.pair_storage is not None and n > 1:
        even = n - n % 2
        pair = dtype.pair_storage
        kernel(out[:even].view(pair), src[:even].view(pair), even // 2, *extra)
        out, src, n = out[even:], src[even:], n - even
    if n:
        kernel(out, src, n, *extra)
