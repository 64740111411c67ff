"""ringlib.transport: moves buffers between ranks over ZeroMQ; knows nothing of reductions.

The bottom layer: an Endpoint per peer (a PULL socket it binds, a PUSH socket per peer it
sends to), a msgpack header per message with the payload in its own zero-copy frame, an
inbox that files messages by collective, step and sender, direct socket links beside
ZeroMQ for small messages, shared-memory links and single-copy reads between peers on
one host, heartbeats that find lost peers, and optional CurveZMQ.
"""

from .context import context
from .endpoint import DIRECT_BYTES, Endpoint
from .frames import PROTOCOL_VERSION, Header, Kind
from .inbox import Inbox, Message
from .shared import discard, held
from .single_copy import Released, RemotePayload
from .trackers import wait_sent

__all__ = ["DIRECT_BYTES", "Endpoint", "Header", "Inbox", "Kind", "Message", "PROTOCOL_VERSION",
           "Released", "RemotePayload", "context", "discard", "held", "wait_sent"]
