"""Collectives as spans in torch.profiler traces: `ringlib:all_reduce` and the others,
recorded in the thread that called them, beside the forward and backward ops (spans
opened on the ring's loop thread would sit on a thread of their own, or nowhere).

Costs a dictionary lookup where torch is not loaded, and a check of the profiler's flag
where it is and no profiler runs."""

from __future__ import annotations

import sys
from typing import Any


def span(name: str) -> Any:
    """A context manager recording `ringlib:<name>` where a torch profiler records; None
    where none does."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.autograd._profiler_enabled():
        return None
    return torch.autograd.profiler.record_function(f"ringlib:{name}")
