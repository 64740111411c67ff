"""The reduction ops a collective can apply."""

from __future__ import annotations

import enum

from .errors import UnsupportedOp


class Op(str, enum.Enum):
    """Element-wise reduction op; accepted wherever an op name string is."""

    SUM = "sum"
    MEAN = "mean"
    MIN = "min"
    MAX = "max"
    PROD = "prod"

    @classmethod
    def parse(cls, op: "Op | str") -> "Op":
        """Return the Op for `op` (an Op or its lower-case name), or raise UnsupportedOp."""
        try:
            return _BY_NAME[op]
        except (KeyError, TypeError):
            names = ", ".join(repr(o.value) for o in cls)
            raise UnsupportedOp(f"unknown reduction op {op!r}; expected one of {names}") from None


_BY_NAME = {o.value: o for o in Op}  # Op members are strs, so they find themselves too
