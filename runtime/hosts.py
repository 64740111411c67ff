"""Where the launcher puts ranks: hosts with slots, and the address and port of each rank.

--hosts takes `name[@address][:slots]` entries separated by commas; a hostfile holds one
entry per line, in that form or MPI's `name slots=N`, with `#` comments. `name` is what
the rsh template's {host} becomes; `address` is what peers connect to (by default the name
itself, which must then resolve). Ranks fill the hosts in order, `slots` at a time; a
host named twice counts once, with the slots of both, so that each host's ranks are
contiguous (what a hierarchical collective groups by).
"""

from __future__ import annotations

import contextlib
import re
import socket
from dataclasses import dataclass
from pathlib import Path

from ringlib.errors import RendezvousError

LOCAL_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
_ENTRY = re.compile(r"^(?P<name>[^@:\s]+)(?:@(?P<address>[^:\s]+))?(?::(?P<slots>\d+))?$")


@dataclass(frozen=True)
class Host:
    name: str
    address: str
    slots: int

    @property
    def local(self) -> bool:
        """Whether ranks on this host start directly, without the rsh template."""
        return self.name in LOCAL_NAMES or self.name == socket.gethostname()


@dataclass(frozen=True)
class Seat:
    """One rank's place: its host and its index among that host's ranks."""

    rank: int
    host: Host
    local_rank: int


def parse_hosts(text: str) -> list[Host]:
    """Hosts from `a:2,b@10.0.0.2:2`; a host without slots gets one."""
    return [_entry(part.strip(), f"--hosts {text!r}") for part in text.split(",") if part.strip()]


def read_hostfile(path: str | Path) -> list[Host]:
    """Hosts from a file of `name[@address][:slots]` or `name slots=N` lines."""
    hosts = []
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        line = line.split("#", 1)[0].strip()
        if line:
            line = re.sub(r"\s+slots\s*=\s*(\d+)$", r":\1", line)
            hosts.append(_entry(line, f"{path}, line {number}"))
    return hosts


def _entry(text: str, where: str) -> Host:
    match = _ENTRY.match(text)
    if not match or match["slots"] == "0":
        raise RendezvousError(f"cannot read host entry {text!r} in {where}: "
                              "expected name[@address][:slots] with slots >= 1")
    name = match["name"]
    return Host(name, match["address"] or name, int(match["slots"] or 1))


def seat(ranks: int | None, hosts: list[Host]) -> list[Seat]:
    """Place `ranks` ranks (default: every slot) on the hosts in order, each host's
    contiguously."""
    hosts = grouped(hosts)
    capacity = sum(h.slots for h in hosts)
    ranks = capacity if ranks is None else ranks
    if ranks < 1 or ranks > capacity:
        raise RendezvousError(f"cannot place {ranks} ranks on {capacity} slots "
                              f"({', '.join(f'{h.name}:{h.slots}' for h in hosts)})")
    seats: list[Seat] = []
    for host in hosts:
        for local_rank in range(min(host.slots, ranks - len(seats))):
            seats.append(Seat(len(seats), host, local_rank))
    return seats


def grouped(hosts: list[Host]) -> list[Host]:
    """`hosts` with each host named once, where it first appears, with all its slots; the
    same name at two addresses is a RendezvousError."""
    merged: dict[str, Host] = {}
    for host in hosts:
        seen = merged.get(host.name)
        if seen is not None and seen.address != host.address:
            raise RendezvousError(f"host {host.name!r} is listed at two addresses, "
                                  f"{seen.address} and {host.address}")
        merged[host.name] = host if seen is None else \
            Host(host.name, host.address, seen.slots + host.slots)
    return list(merged.values())


class PortReservation:
    """Free ports on this host, held bound (not listening, SO_REUSEADDR) until closed.

    Peers can still bind them (ZeroMQ sets SO_REUSEADDR too), but the kernel hands them to
    nobody else meanwhile: two launchers started at once never pick the same port.
    """

    def __init__(self, count: int, host: str = "127.0.0.1") -> None:
        self._stack = contextlib.ExitStack()
        self.ports = []
        for _ in range(count):
            probe = self._stack.enter_context(socket.socket())
            probe.bind((host, 0))
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.ports.append(probe.getsockname()[1])

    def close(self) -> None:
        self._stack.close()
