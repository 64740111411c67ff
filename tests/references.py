"""Random operands and float64 references for the reduction tests."""

from __future__ import annotations

import numpy as np
import torch

FLOATS = ("float32", "float64", "float16", "bfloat16")
INTS = ("int8", "uint8", "int32", "int64")
DTYPES = FLOATS + INTS
OPS = ("sum", "prod", "min", "max", "mean")
SPECIALS = np.array([np.nan, np.inf, -np.inf, -0.0, 0.0])


def operand(dtype: str, n: int, rng: np.random.Generator, specials: bool = False):
    """n random elements of `dtype`: a torch tensor for bfloat16, else a numpy array."""
    if dtype in INTS:
        info = np.iinfo(dtype)
        small = rng.random() < 0.5  # half the time small values, so prod rarely wraps
        lo, hi = (-9, 9) if small else (info.min, info.max)
        return rng.integers(max(lo, info.min), hi, n, dtype=dtype, endpoint=True)
    values = rng.standard_normal(n) * 10.0 ** rng.integers(-3, 3)
    if specials and n:
        where = rng.integers(0, n, max(1, n // 50))
        values[where] = rng.choice(SPECIALS, where.size)
    if dtype == "bfloat16":
        return torch.from_numpy(values.astype(np.float32)).to(torch.bfloat16)
    return values.astype(dtype)


def as_float64(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.to(torch.float64).numpy()
    return x.astype(np.float64)


def reference(op: str, a, b, count: int) -> np.ndarray:
    """The exact result in float64 (floats) or int64 (integers, wrapping on the cast back)."""
    if isinstance(a, np.ndarray) and a.dtype.kind in "iu":
        x, y = a.astype(np.int64), b.astype(np.int64)
    else:
        x, y = as_float64(a), as_float64(b)
    if op == "sum":
        return x + y
    if op == "prod":
        return x * y
    if op == "min":
        return np.minimum(x, y)
    if op == "max":
        return np.maximum(x, y)
    return (x + y) / count


def rounded_like(ref: np.ndarray, like):
    """The reference rounded once to `like`'s dtype, as a float64 array for comparison."""
    if isinstance(like, torch.Tensor):
        return torch.from_numpy(ref).to(like.dtype).to(torch.float64).numpy()
    return ref.astype(like.dtype).astype(np.float64)


def ulp(ref: np.ndarray, like) -> np.ndarray:
    """One unit in the last place of `like`'s dtype at each reference value."""
    # (significand bits, spacing of the subnormals)
    formats = {"bfloat16": (8, 2.0**-133), "float16": (11, 2.0**-24),
               "float32": (24, 2.0**-149), "float64": (53, 2.0**-1074)}
    bits, smallest = formats[str(like.dtype).removeprefix("torch.")]
    magnitude = np.abs(np.nan_to_num(ref, nan=0.0, posinf=0.0, neginf=0.0))
    exponent = np.floor(np.log2(np.maximum(magnitude, np.finfo(np.float64).tiny)))
    return np.maximum(2.0 ** (exponent - bits + 1), smallest)
