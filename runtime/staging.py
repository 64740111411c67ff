"""Tensors as the ring takes them, and the results put back where torch expects them.

The ring reduces C-contiguous CPU buffers of the compiled core's dtypes. A torch call may
pass a non-contiguous tensor, a bool one (which travels as uint8, the same bytes), or
several tensors at once (the _coalesced ops): Staged makes one buffer of them, the tensor
itself where it already is one, and writes the result back after.
"""

from __future__ import annotations

import torch

from ringlib.dtypes import lookup
from ringlib.errors import InvalidBuffer, UnsupportedDtype


def wire(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` as it travels: bool as uint8 (a view, no copy), the rest as they are."""
    return tensor.view(torch.uint8) if tensor.dtype == torch.bool else tensor


def check(tensor: torch.Tensor, what: str) -> None:
    """Raise the ring's error for a tensor it cannot take, before anything is sent."""
    if not isinstance(tensor, torch.Tensor):
        raise InvalidBuffer(f"{what} takes tensors, not {type(tensor).__name__}")
    if tensor.device.type != "cpu":
        raise InvalidBuffer(f"{what}: a tensor on {tensor.device}; the ringlib backend "
                            "takes CPU tensors")
    try:
        lookup(str(wire(tensor).dtype))
    except UnsupportedDtype as exc:
        raise UnsupportedDtype(f"{what}: {exc}") from None


def write(out: torch.Tensor, data: torch.Tensor) -> None:
    """Copy `data` (as it travelled) into `out`, of the same number of elements."""
    target = wire(out)
    target.copy_(data.reshape(out.shape))
    _as_bool(out, target)


def _as_bool(tensor: torch.Tensor, travelled: torch.Tensor) -> None:
    """Make `travelled`, the uint8 view of a bool `tensor`, hold 0 or 1: a sum of trues
    is true."""
    if tensor.dtype == torch.bool:
        travelled.clamp_(max=1)


class Staged:
    """`tensors` (of one dtype) as one buffer: the tensor itself where there is one and
    it is contiguous (unless `copy`), else a flat copy of them all."""

    def __init__(self, tensors: list[torch.Tensor], what: str, copy: bool = False) -> None:
        for tensor in tensors:
            check(tensor, what)
        self.tensors = tensors
        views = [wire(t) for t in tensors]
        self._own = copy or len(views) != 1 or not views[0].is_contiguous()
        if not self._own:
            self.buffer = views[0]
        elif views:
            self.buffer = torch.cat([v.detach().reshape(-1) for v in views])
        else:
            self.buffer = torch.empty(0, dtype=torch.uint8)

    def write_back(self) -> None:
        """Put the result in the buffer back into the tensors."""
        if not self._own:
            _as_bool(self.tensors[0], self.buffer)
            return
        offset = 0
        for tensor in self.tensors:
            write(tensor, self.buffer[offset:offset + tensor.numel()])
            offset += tensor.numel()


def by_dtype(tensors: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """`tensors` grouped by dtype, in order of first appearance."""
    groups: dict[torch.dtype, list[torch.Tensor]] = {}
    for tensor in tensors:
        groups.setdefault(tensor.dtype, []).append(tensor)
    return list(groups.values())
