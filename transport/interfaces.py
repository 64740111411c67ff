"""Network interfaces by name: the address a rank binds and advertises when it is told
which interface to use (RINGLIB_IFNAME, as GLOO_SOCKET_IFNAME and NCCL_SOCKET_IFNAME),
instead of the one that routes towards rank 0."""

from __future__ import annotations

import fcntl
import ipaddress
import socket
import struct
from pathlib import Path

from ringlib.errors import InvalidArgument

_SIOCGIFADDR = 0x8915  # linux/sockios.h: an interface's IPv4 address
_IF_INET6 = Path("/proc/net/if_inet6")


def address_of(name: str) -> str:
    """The IP address of interface `name` (its IPv4 address, else its first global IPv6
    one). InvalidArgument for a name this host has no interface of, listing the ones it
    has, or for an interface without an address."""
    found = addresses()
    if name not in found:
        there = ", ".join(f"{n} ({a or 'no address'})" for n, a in sorted(found.items()))
        raise InvalidArgument(f"no network interface {name!r} on {socket.gethostname()}; "
                              f"there are: {there}")
    if found[name] is None:
        raise InvalidArgument(f"network interface {name!r} on {socket.gethostname()} has "
                              "no IP address")
    return found[name]


def addresses() -> dict[str, str | None]:
    """Every interface of this host, with its address (None: it has none)."""
    return {name: _ipv4(name) or _ipv6(name) for _, name in socket.if_nameindex()}


def _ipv4(name: str) -> str | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            answer = fcntl.ioctl(probe.fileno(), _SIOCGIFADDR,
                                 struct.pack("256s", name.encode()[:15]))
        except OSError:  # EADDRNOTAVAIL: no IPv4 address
            return None
    return socket.inet_ntoa(answer[20:24])


def _ipv6(name: str) -> str | None:
    """The first global (scope 0) address of `name` in /proc/net/if_inet6."""
    try:
        lines = _IF_INET6.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        hex_address, _, _, scope, _, device = line.split()
        if device == name and scope == "00":
            return str(ipaddress.IPv6Address(bytes.fromhex(hex_address)))
    return None
