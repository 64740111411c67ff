"""ringlib.collectives: ring all-reduce, reduce-scatter, all-gather, broadcast, barrier.

Built on the compiled core (ringlib.reduce, ringlib.partition) and on the transport's
send/receive interface, seen through a Channel; it never touches sockets. One algorithm
per file, each opening with its cost; choose.py picks one by buffer size.
"""

from .channel import Channel, signature
from .choose import (SMALL_BYTES, all_gather, all_reduce, all_reduce_algorithm, barrier, broadcast,
                     reduce_scatter, step_reducers)

__all__ = ["Channel", "SMALL_BYTES", "all_gather", "all_reduce", "all_reduce_algorithm", "barrier",
           "broadcast", "reduce_scatter", "signature", "step_reducers"]
