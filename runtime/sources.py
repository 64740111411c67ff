"""The batches one pipeline run takes: a plain iterable, or an async one (requests that
arrive over time: serving.py), handed out numbered.

A pull from an async source that is in progress when the feeder taking it is cancelled
(the pipeline lost a stage and re-forms: pipeline.py) is kept, and the next feeder gets
its batch: none is lost or taken twice.
"""

from __future__ import annotations

import asyncio
from typing import Any, AsyncIterable, Iterable

from .activations import Activation


class Source:
    """`batches`, numbered from 0."""

    def __init__(self, batches: Iterable[Activation] | AsyncIterable[Activation]) -> None:
        self._sync = None if hasattr(batches, "__aiter__") else iter(batches)
        self._async = batches.__aiter__() if self._sync is None else None
        self._pull: asyncio.Future | None = None
        self._count = 0

    async def next(self) -> tuple[int, Activation] | None:
        """(number, batch) of the next batch, None after the last."""
        if self._sync is not None:
            whole = next(self._sync, _END)
        else:
            if self._pull is None:
                self._pull = asyncio.ensure_future(self._async.__anext__())
            try:
                whole = await asyncio.shield(self._pull)
            except StopAsyncIteration:
                whole = _END
            self._pull = None  # taken: not when the shield above was cancelled
        if whole is _END:
            return None
        self._count += 1
        return self._count - 1, whole

    def close(self) -> None:
        """Stop a pull still waiting (the run is over)."""
        if self._pull is not None:
            self._pull.cancel()
            self._pull = None


_END: Any = object()
