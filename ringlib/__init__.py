"""ringlib: an asyncio peer-to-peer ring all-reduce runtime over ZeroMQ, with a compiled core.

Users import only this package. What it exports today is the compiled reduction core;
the ring itself (connect, init, the collectives) is built on it in ringlib.collectives,
ringlib.transport and ringlib.runtime.
"""

from .dtypes import DType
from .errors import InvalidBuffer, RingError, UnsupportedBuffer, UnsupportedDtype, UnsupportedOp
from .ops import Op
from .partition import chunk, chunk_bounds, sub_chunks
from .reduce import reduce_into

__version__ = "0.1.0"

__all__ = [
    "DType",
    "InvalidBuffer",
    "Op",
    "RingError",
    "UnsupportedBuffer",
    "UnsupportedDtype",
    "UnsupportedOp",
    "chunk",
    "chunk_bounds",
    "reduce_into",
    "sub_chunks",
    "__version__",
]
