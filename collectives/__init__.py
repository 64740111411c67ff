"""ringlib.collectives: ring all-reduce, reduce-scatter, all-gather, broadcast, barrier.

Built on the compiled core (ringlib.reduce_into, ringlib.partition) and on the transport's
send/receive interface only; it never touches sockets. The algorithms arrive with the ring
issue, one per file.
"""
