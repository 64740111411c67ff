"""A ring's tunables: their defaults, their environment variables, and their checks."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from ringlib import collectives
from ringlib.errors import InvalidArgument
from ringlib.transport import DIRECT_BYTES

CONNECT_TIMEOUT = 60.0       # seconds to wait for the neighbours at start-up
COLLECTIVE_TIMEOUT = 300.0   # default deadline of one collective
SEGMENT_BYTES = 4 << 20      # the largest message a ring step sends; pieces pipeline
SPIN_US = 200                # how long small collectives poll for a message before yielding
HEARTBEAT_S = 0.5            # how often a rank tells its neighbours it is alive
PEER_TIMEOUT = 5.0           # silence after which a neighbour is lost (PeerLost)
SHM_BYTES = 32 << 20         # a shared-memory link's ring to the right neighbour
SIDE_SHM_BYTES = 1 << 20     # ... and to any other rank, which gets small messages only
WITHDRAW_S = 5.0             # how long a failed collective waits for peers to let go of
                             # the buffers it lent them by address


@dataclass(frozen=True)
class Settings:
    """A ring's tunables; see connect()."""

    collective_timeout: float = COLLECTIVE_TIMEOUT
    segment_bytes: int = field(default_factory=lambda: _env_number("RINGLIB_SEGMENT_BYTES",
                                                                SEGMENT_BYTES))
    small_bytes: int = field(default_factory=lambda: _env_number("RINGLIB_SMALL_BYTES",
                                                              collectives.SMALL_BYTES))
    spin_us: int = field(default_factory=lambda: _env_number("RINGLIB_SPIN_US", SPIN_US))
    direct_bytes: int = field(default_factory=lambda: _env_number("RINGLIB_DIRECT_BYTES",
                                                               DIRECT_BYTES))
    heartbeat_s: float = field(default_factory=lambda: _env_number("RINGLIB_HEARTBEAT_S",
                                                                HEARTBEAT_S))
    peer_timeout: float = field(default_factory=lambda: _env_number("RINGLIB_PEER_TIMEOUT",
                                                                 PEER_TIMEOUT))
    curve_key: str | None = field(default_factory=lambda: os.environ.get("RINGLIB_CURVE_KEY"))
    shm_bytes: int = field(default_factory=lambda: _env_number("RINGLIB_SHM_BYTES", SHM_BYTES))

    def __post_init__(self) -> None:
        if not isinstance(self.shm_bytes, int) or self.shm_bytes < 0:
            raise InvalidArgument(f"shm_bytes={self.shm_bytes!r} must be a whole number of "
                                  "bytes, 0 (off) or more")
        if self.peer_timeout and not 0 < self.heartbeat_s < self.peer_timeout:
            raise InvalidArgument(f"heartbeat_s={self.heartbeat_s} must be above 0 and below "
                                  f"peer_timeout={self.peer_timeout}")


def _env_number(name: str, default: float) -> float:
    try:
        return type(default)(os.environ.get(name, default))
    except ValueError:
        raise InvalidArgument(f"{name}={os.environ[name]!r} is not a number") from None


def connect_timeout() -> float:
    """Seconds to wait for the peers at start-up: RINGLIB_CONNECT_TIMEOUT or the default."""
    return float(_env_number("RINGLIB_CONNECT_TIMEOUT", CONNECT_TIMEOUT))
