"""Activations on the wire and in micro-batches: a tensor, a tuple or a dict of tensors.

pack() turns an activation into a small description (its structure, dtypes and shapes)
and the tensors' raw bytes, which travel as frames of their own without being copied;
unpack() rebuilds the tensors on top of the received frames. split() cuts a batch into
micro-batches along the first dimension and join() puts outputs back together.
"""

from __future__ import annotations

from typing import Any, Union

import numpy as np
import torch

from ringlib.errors import InvalidArgument

Activation = Union[torch.Tensor, tuple, dict]


def flatten(act: Activation) -> tuple[str, list[str], list[torch.Tensor]]:
    """(structure, keys, tensors): structure is "tensor", "tuple" or "dict"."""
    if isinstance(act, torch.Tensor):
        return "tensor", [], [act]
    if isinstance(act, (tuple, list)) and all(isinstance(t, torch.Tensor) for t in act):
        return "tuple", [], list(act)
    if isinstance(act, dict) and all(isinstance(t, torch.Tensor) for t in act.values()):
        return "dict", list(act), list(act.values())
    raise InvalidArgument("an activation is a tensor, or a tuple or dict of tensors, "
                          f"not {type(act).__name__}")


def rebuild(structure: str, keys: list[str], tensors: list[torch.Tensor]) -> Activation:
    if structure == "tensor":
        return tensors[0]
    if structure == "tuple":
        return tuple(tensors)
    return dict(zip(keys, tensors))


# Tensors of these dtypes pass through numpy, whose views cost a microsecond where
# torch's cost several (the pipeline packs and unpacks every micro-batch); the others
# (bfloat16, which numpy lacks) through torch's own byte views.
_NUMPY = {torch.float32: "float32", torch.float64: "float64", torch.float16: "float16",
          torch.int64: "int64", torch.int32: "int32", torch.int16: "int16",
          torch.int8: "int8", torch.uint8: "uint8", torch.bool: "bool"}


def pack(act: Activation) -> tuple[dict[str, Any], list[Any]]:
    """The description of `act` and one byte buffer per tensor (views, not copies)."""
    structure, keys, tensors = flatten(act)
    tensors = [t.detach().contiguous() for t in tensors]
    meta = {"structure": structure, "keys": keys,
            "dtypes": [str(t.dtype).removeprefix("torch.") for t in tensors],
            "shapes": [list(t.shape) for t in tensors]}
    return meta, [_bytes_of(t) for t in tensors]


def _bytes_of(tensor: torch.Tensor) -> np.ndarray:
    """A contiguous CPU tensor's memory as a flat uint8 array."""
    if tensor.dtype in _NUMPY:
        return tensor.numpy().reshape(-1).view(np.uint8)
    return tensor.reshape(-1).view(torch.uint8).numpy()


def unpack(meta: dict[str, Any], buffers: list[Any]) -> Activation:
    """The activation `meta` describes, its tensors on top of `buffers` (no copy)."""
    tensors = []
    for dtype, shape, buffer in zip(meta["dtypes"], meta["shapes"], buffers):
        kind = getattr(torch, dtype)
        if kind in _NUMPY and len(buffer):
            tensors.append(torch.from_numpy(np.frombuffer(buffer, _NUMPY[kind]).reshape(shape)))
            continue
        flat = (torch.frombuffer(buffer, dtype=torch.uint8) if len(buffer)
                else torch.empty(0, dtype=torch.uint8))
        tensors.append(flat.view(kind).reshape(shape))
    return rebuild(meta["structure"], meta["keys"], tensors)


def owned(out: Activation, inp: Activation) -> Activation:
    """`out`, with any of its tensors that lie in the memory of `inp`'s (a stage that
    returned its input, or a view of it) copied out, so that `inp`'s may be given back."""
    if out is None:
        return out
    inputs = {t.untyped_storage().data_ptr() for t in flatten(inp)[2]}
    structure, keys, tensors = flatten(out)
    if not any(t.untyped_storage().data_ptr() in inputs for t in tensors):
        return out
    return rebuild(structure, keys, [t.clone() if t.untyped_storage().data_ptr() in inputs
                                     else t for t in tensors])


def count_rows(act: Activation) -> int:
    """The first dimension that every tensor of `act` shares: its rows."""
    return _rows_of(flatten(act)[2])


def _rows_of(tensors: list[torch.Tensor]) -> int:
    sizes = {t.shape[0] if t.dim() else None for t in tensors}
    if len(sizes) != 1 or None in sizes:
        raise InvalidArgument(f"every tensor of a batch needs the same first dimension, got "
                              f"shapes {[tuple(t.shape) for t in tensors]}")
    return sizes.pop()


def split(act: Activation, rows: int | list[int]) -> list[Activation]:
    """Micro-batches of at most `rows` rows each (the last may be smaller), or of the
    given list of row counts."""
    structure, keys, tensors = flatten(act)
    _rows_of(tensors)  # raises for tensors that do not share a first dimension
    pieces = [t.split(rows) for t in tensors]
    return [rebuild(structure, keys, list(parts)) for parts in zip(*pieces)]


def join(parts: list[Activation]) -> Activation:
    """The micro-batches' outputs, concatenated back into one batch."""
    structure, keys, _ = flatten(parts[0])
    columns = zip(*(flatten(p)[2] for p in parts))
    return rebuild(structure, keys, [torch.cat(column) for column in columns])
