"""ringlib.transport: moves buffers between ranks; knows nothing of reductions.

The bottom layer. An Endpoint per rank routes each message over one of its links:
ZeroMQ (zmq_links.py: a PULL socket it binds, a PUSH socket per peer), direct stream
sockets for small messages (direct_links.py), or shared memory to peers on this host
(shared_links.py, with single-copy reads of large payloads); it files what arrives in an
Inbox by key, and Liveness spreads the word on lost peers. A message is a header
(frames.py: one typed constructor and key per kind) and at most one payload frame, sent
without copying. Streams (streams.py) are numbered flows outside the collectives.
"""

from . import frames
from .endpoint import DIRECT_BYTES, Endpoint
from .frames import PROTOCOL_VERSION, Header, Key, Kind
from .inbox import Inbox, Message
from .shared import discard, held
from .single_copy import Released, RemotePayload
from .streams import Stream
from .trackers import wait_sent

__all__ = ["DIRECT_BYTES", "Endpoint", "Header", "Inbox", "Key", "Kind", "Message",
           "PROTOCOL_VERSION", "Released", "RemotePayload", "Stream", "discard", "frames",
           "held", "wait_sent"]
