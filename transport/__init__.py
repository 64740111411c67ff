"""ringlib.transport: moves buffers between ranks over ZeroMQ; knows nothing of reductions.

The bottom layer. The collectives above it see only a small send/receive interface, so
they can also run over an in-memory link in tests. Its sockets arrive with the ring issue.
"""
