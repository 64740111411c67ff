"""A ring's tunables: their defaults, their environment variables, and their checks."""

from __future__ import annotations

import math
import numbers
import os
from dataclasses import dataclass, field
from typing import Any

from ringlib import collectives
from ringlib.errors import InvalidArgument
from ringlib.transport import DIRECT_BYTES

CONNECT_TIMEOUT = 60.0       # seconds to wait for the neighbours at start-up
COLLECTIVE_TIMEOUT = 300.0   # default deadline of one collective
SEGMENT_BYTES = 4 << 20      # the largest message a ring step sends; pieces pipeline
CURVE_SEGMENT_BYTES = 1 << 20  # ... with keys: CurveZMQ encrypts smaller messages faster
SPIN_US = 200                # how long small collectives poll for a message before yielding
HEARTBEAT_S = 0.5            # how often a rank tells its neighbours it is alive
PEER_TIMEOUT = 5.0           # silence after which a neighbour is lost (PeerLost)
SHM_BYTES = 32 << 20         # a shared-memory link's ring to the right neighbour
SIDE_SHM_BYTES = 1 << 20     # ... and to any other rank, which gets small messages only


@dataclass(frozen=True)
class Settings:
    """A ring's tunables: connect() and init() take each as a keyword, and a Ring reads and
    sets them as attributes (Ring.configure). Each default comes from its environment
    variable where that is set.

    collective_timeout: the default deadline of each collective, in seconds
        (CollectiveTimeout after it; default 300).
    segment_bytes: the largest message of a ring step; larger chunks travel in pieces that
        pipeline (RINGLIB_SEGMENT_BYTES, default 4 MiB, or 1 MiB with curve_key: CurveZMQ
        encrypts 1 MiB messages 1.4x faster than 4 MiB ones).
    small_bytes: buffers up to this size take the latency-optimal algorithms
        (RINGLIB_SMALL_BYTES, default collectives.SMALL_BYTES, 128 KiB).
    spin_us: how long a small collective polls its links for each message before it
        yields to the event loop; 0 never polls (RINGLIB_SPIN_US, default 200). Polling
        spares the event loop's wake-ups and burns a core meanwhile.
    direct_bytes: messages up to this size travel over direct socket links beside ZeroMQ
        where both peers can open one; 0 never (RINGLIB_DIRECT_BYTES, default 256 KiB).
    heartbeat_s, peer_timeout: each rank sends its ring neighbours a heartbeat every
        heartbeat_s seconds, and a neighbour silent for peer_timeout seconds is lost:
        collectives raise PeerLost (RINGLIB_HEARTBEAT_S, default 0.5;
        RINGLIB_PEER_TIMEOUT, default 5; a peer_timeout of 0 never declares a peer lost).
    curve_key: path of the ring's secret key file (`ringlib keygen`); every link is then
        authenticated and encrypted with CurveZMQ, and a process without the key can
        neither join nor send (RINGLIB_CURVE_KEY; default none: plain links).
    shm_bytes: ranks on one host pass collective payloads through shared memory (/dev/shm)
        instead of sockets; this is the ring each rank writes for its right neighbour
        (1 MiB for other ranks), and a message that does not fit takes a socket. 0 turns
        shared memory off (RINGLIB_SHM_BYTES, default 32 MiB).
    compiled_bytes: where every rank of the ring is on one host, collectives whose
        buffer (an all_gather's input) is at most this size run as compiled calls over a
        shared arena, with no messages (collectives/compiled.py); the arena holds two slots
        of this size per rank (or smaller, where /dev/shm cannot hold it), made at
        connect from rank 0's value. 0, or shm_bytes 0, turns it off
        (RINGLIB_COMPILED_BYTES, default collectives.COMPILED_BYTES, 8 MiB).
    mesh_bytes: on rings of up to 8 ranks over tcp without keys or a shared arena (ranks
        on several hosts, or shared memory off), all-reduces up to this size and barriers
        run over a plain TCP connection between every two ranks, driven by the calling
        thread (collectives/mesh_path.py); 0 turns it off (RINGLIB_MESH_BYTES, default
        collectives.MESH_BYTES, 64 KiB).
    mesh_ring: where the mesh runs (see mesh_bytes), larger all-reduces stream round the
        ring over it, driven by the calling thread, each piece reduced as it comes
        (collectives/mesh_ring_allreduce.py); False sends them through ZeroMQ
        (RINGLIB_MESH_RING, default 1).
    hierarchical: on rings of several hosts with the same number of ranks on each (by
        their addresses), all-reduces above small_bytes reduce within each host first,
        then across the hosts, each local rank carrying its slice, then gather within
        the host (collectives/hierarchical_allreduce.py); False keeps the flat ring
        (RINGLIB_HIERARCHICAL, default 1).
    ifname: the network interface (eth1, ib0) whose address this rank binds and
        advertises, as GLOO_SOCKET_IFNAME does; a name this host has none of is
        InvalidArgument listing the ones it has (RINGLIB_IFNAME; default: the interface
        that routes towards rank 0).
    timeline: where every rank writes its trace (runtime/timeline.py), "{rank}" in it
        replaced by the rank, or a directory to hold trace-{rank}.json (RINGLIB_TIMELINE;
        default none: no timeline). Ring.start_timeline() starts one later.
    flight_dir: a directory where a rank also writes its flight recorder (its last
        collectives) when one fails or it gets SIGUSR1; the log gets it anyway
        (RINGLIB_FLIGHT_DIR; default none).
    flight_kept: how many of its last collectives a rank's flight recorder keeps
        (RINGLIB_FLIGHT_KEPT, default 256); 0 turns it off, and saves the record each
        collective costs (bench/observing.py measures it).
    """

    collective_timeout: float = COLLECTIVE_TIMEOUT
    segment_bytes: int | None = field(default_factory=lambda: _env_number("RINGLIB_SEGMENT_BYTES",
                                                                None))
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
    compiled_bytes: int = field(default_factory=lambda: _env_number(
        "RINGLIB_COMPILED_BYTES", collectives.COMPILED_BYTES))
    mesh_bytes: int = field(default_factory=lambda: _env_number(
        "RINGLIB_MESH_BYTES", collectives.MESH_BYTES))
    mesh_ring: bool = field(default_factory=lambda: bool(_env_number("RINGLIB_MESH_RING", 1)))
    hierarchical: bool = field(default_factory=lambda: bool(_env_number(
        "RINGLIB_HIERARCHICAL", 1)))
    ifname: str | None = field(default_factory=lambda: os.environ.get("RINGLIB_IFNAME") or None)
    timeline: str | None = field(default_factory=lambda: os.environ.get("RINGLIB_TIMELINE")
                                 or None)
    flight_dir: str | None = field(default_factory=lambda: os.environ.get("RINGLIB_FLIGHT_DIR")
                                   or None)
    flight_kept: int = field(default_factory=lambda: _env_number("RINGLIB_FLIGHT_KEPT", 256))

    def __post_init__(self) -> None:
        if self.segment_bytes is None:
            object.__setattr__(self, "segment_bytes", SEGMENT_BYTES if self.curve_key is None
                               else CURVE_SEGMENT_BYTES)
        for name in ("small_bytes", "spin_us", "direct_bytes", "shm_bytes", "compiled_bytes",
                     "mesh_bytes", "flight_kept"):
            _whole(name, getattr(self, name), 0)
        _whole("segment_bytes", self.segment_bytes, 1)
        seconds("collective_timeout", self.collective_timeout)
        seconds("peer_timeout", self.peer_timeout, zero=True)
        seconds("heartbeat_s", self.heartbeat_s, zero=True)
        if self.peer_timeout and not 0 < self.heartbeat_s < self.peer_timeout:
            raise InvalidArgument(f"heartbeat_s={self.heartbeat_s} must be above 0 and below "
                                  f"peer_timeout={self.peer_timeout}")
        if self.curve_key is not None and not isinstance(self.curve_key, (str, os.PathLike)):
            raise InvalidArgument(f"curve_key={self.curve_key!r} must be a path")
        for name in ("mesh_ring", "hierarchical"):
            if not isinstance(getattr(self, name), bool):
                raise InvalidArgument(f"{name}={getattr(self, name)!r} must be True or False")
        if self.ifname is not None and (not isinstance(self.ifname, str) or not self.ifname):
            raise InvalidArgument(f"ifname={self.ifname!r} must be an interface's name")
        for name in ("timeline", "flight_dir"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, (str, os.PathLike)) or not value):
                raise InvalidArgument(f"{name}={value!r} must be a path")


def seconds(name: str, value: Any, zero: bool = False) -> float:
    """`value` as a duration in seconds, or InvalidArgument naming `name`: a real number
    (not a bool, not a string), finite, above 0, or 0 too where `zero` (off)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or \
            not math.isfinite(value) or value < 0 or (value == 0 and not zero):
        raise InvalidArgument(f"{name}={value!r} must be a finite number of seconds above 0"
                              + (", or 0 (off)" if zero else ""))
    return float(value)


def _whole(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise InvalidArgument(f"{name}={value!r} must be a whole number, {minimum} or more")


def _env_number(name: str, default: float | None) -> float | None:
    """The environment variable `name` as a number of `default`'s type (int if None), or
    `default` where it is unset."""
    if name not in os.environ:
        return default
    try:
        return (int if default is None else type(default))(os.environ[name])
    except ValueError:
        raise InvalidArgument(f"{name}={os.environ[name]!r} is not a number") from None


def connect_timeout(given: Any = None) -> float:
    """Seconds to wait for the peers at start-up: `given`, else RINGLIB_CONNECT_TIMEOUT or
    the default; InvalidArgument for anything but a finite number above 0."""
    if given is None:
        return seconds("RINGLIB_CONNECT_TIMEOUT",
                       _env_number("RINGLIB_CONNECT_TIMEOUT", CONNECT_TIMEOUT))
    return seconds("timeout", given)
