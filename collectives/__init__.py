"""ringlib.collectives: ring all-reduce, reduce-scatter, all-gather, broadcast, barrier.

Built on the compiled core (ringlib.reduce, ringlib.partition) and on the transport's
send/receive interface, seen through a Channel; it never touches sockets. Sessions
(session.py) own each collective's life on a rank; plan() (choose.py) picks the
algorithm; one algorithm per file, each opening with its cost.
"""

from .channel import Channel, signature
from .choose import (COMPILED_BYTES, MESH_BYTES, SMALL_BYTES, Plan, all_gather, all_reduce, barrier,
                     broadcast, plan, reduce_scatter, step_reducers)
from .session import Session, Sessions

__all__ = ["COMPILED_BYTES", "Channel", "MESH_BYTES", "Plan", "SMALL_BYTES", "Session", "Sessions",
           "all_gather", "all_reduce", "barrier", "broadcast", "plan", "reduce_scatter",
           "signature", "step_reducers"]
