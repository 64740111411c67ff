"""ringlib.runtime: rendezvous, the asyncio Ring and its blocking facade.

The top layer: it reads where this process sits from the environment, finds the peers,
wires the transport and runs the collectives on its event loop.
"""

from .blocking import BlockingRing, init
from .environment import Placement, placement
from .ring import Ring, connect

__all__ = ["BlockingRing", "Placement", "Ring", "connect", "init", "placement"]
