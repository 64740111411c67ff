"""ringlib: an asyncio peer-to-peer ring all-reduce runtime over ZeroMQ, with a compiled core.

Users import only this package: connect() (asyncio) and init() (blocking) join a ring
whose collectives run over ringlib.transport and ringlib.collectives, with reductions in
the compiled core (reduce_into, Numba kernels).

Only the exceptions load with the package itself; every other name, and every
subpackage, loads on first use (PEP 562), so that `import ringlib.transport` loads
nothing above the transport: the layers (runtime -> collectives -> transport) hold in a
running interpreter too.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .errors import (CollectiveTimeout, InvalidArgument, InvalidBuffer, MismatchError,
                     NotSupported, PeerLost, ProtocolError, RendezvousError, RendezvousTimeout,
                     RingClosed, RingError, StageError, Unauthorized, UnsupportedBuffer,
                     UnsupportedDtype, UnsupportedOp, UsageError, WorkerLost)

if TYPE_CHECKING:
    from .dtypes import DType
    from .ops import Op
    from .partition import chunk, chunk_bounds, sub_chunks
    from .reduce import reduce_into
    from .runtime import BlockingRing, Ring, connect, init

__version__ = "0.1.0"

# name -> the module that defines it
_LAZY = {
    "DType": ".dtypes",
    "Op": ".ops",
    "chunk": ".partition",
    "chunk_bounds": ".partition",
    "sub_chunks": ".partition",
    "reduce_into": ".reduce",
    "BlockingRing": ".runtime",
    "Ring": ".runtime",
    "connect": ".runtime",
    "init": ".runtime",
}
# The modules `ringlib.NAME` finds without an import of its own, as it did when this
# package loaded them all.
_MODULES = {"atomics", "collectives", "dtypes", "kernels", "ops", "partition", "reduce",
            "runtime", "transport"}


def __getattr__(name: str) -> Any:
    if name in _MODULES:
        return importlib.import_module(f".{name}", __name__)
    if name not in _LAZY:
        raise AttributeError(f"module 'ringlib' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name], __name__), name)
    globals()[name] = value  # later lookups find it without coming here
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "BlockingRing",
    "CollectiveTimeout",
    "DType",
    "InvalidArgument",
    "InvalidBuffer",
    "MismatchError",
    "NotSupported",
    "Op",
    "PeerLost",
    "ProtocolError",
    "RendezvousError",
    "RendezvousTimeout",
    "Ring",
    "RingClosed",
    "RingError",
    "StageError",
    "Unauthorized",
    "UnsupportedBuffer",
    "UnsupportedDtype",
    "UnsupportedOp",
    "UsageError",
    "WorkerLost",
    "chunk",
    "chunk_bounds",
    "connect",
    "init",
    "reduce_into",
    "sub_chunks",
    "__version__",
]
