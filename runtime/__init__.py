"""ringlib.runtime: rendezvous, the asyncio ring object and its blocking facade.

The top layer: it finds the peers, wires the transport and runs the collectives on its
event loop. It arrives with the ring issue.
"""
