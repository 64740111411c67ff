"""ringlib: an asyncio peer-to-peer ring all-reduce runtime over ZeroMQ, with a compiled core.

Users import only this package: connect() (asyncio) and init() (blocking) join a ring
whose collectives run over ringlib.transport and ringlib.collectives, with reductions in
the compiled core (reduce_into, Numba kernels).
"""

from .dtypes import DType
from .errors import (CollectiveTimeout, InvalidArgument, InvalidBuffer, MismatchError, PeerLost,
                     ProtocolError, RendezvousError, RendezvousTimeout, RingClosed, RingError,
                     StageError, Unauthorized, UnsupportedBuffer, UnsupportedDtype, UnsupportedOp)
from .ops import Op
from .partition import chunk, chunk_bounds, sub_chunks
from .reduce import reduce_into
from .runtime import BlockingRing, Ring, connect, init

__version__ = "0.1.0"

__all__ = [
    "BlockingRing",
    "CollectiveTimeout",
    "DType",
    "InvalidArgument",
    "InvalidBuffer",
    "MismatchError",
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
    "chunk",
    "chunk_bounds",
    "connect",
    "init",
    "reduce_into",
    "sub_chunks",
    "__version__",
]
