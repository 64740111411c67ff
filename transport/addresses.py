"""ZeroMQ endpoint addresses: checking them, and turning an advertised address into one to bind.

A peer advertises one address (what the others connect to) and binds the same endpoint.
tcp:// takes a host name or IP and a port; ipc:// a filesystem path (peers on one host);
inproc:// a name (peers that are threads or tasks of one process, as in the tests).
"""

from __future__ import annotations

import contextlib
import ipaddress
import random
import re
import socket

from ringlib.errors import RendezvousError

SCHEMES = ("tcp", "ipc", "inproc")
# Ports from here up to the ephemeral range are given out by free_tcp_ports (below are
# services' customary ones; Ray's workers take 10002-19999).
EXPLICIT_PORTS = 20000


def check(address: str, bind: bool = False) -> str:
    """Return `address` unchanged if it is a usable peer address, else raise RendezvousError.
    With `bind`, a tcp port of 0 (any free port) is allowed too."""
    scheme, sep, rest = address.partition("://")
    if not sep or scheme not in SCHEMES or not rest:
        raise RendezvousError(f"peer address {address!r} is not tcp://host:port, "
                              "ipc:///path or inproc://name")
    if scheme == "tcp":
        split_host_port(address, bind)
    return address


def split_host_port(address: str, bind: bool = False) -> tuple[str, int]:
    """('host', port) of a tcp:// address; IPv6 hosts come in brackets: tcp://[::1]:5555."""
    rest = address.removeprefix("tcp://")
    host, sep, port = rest.rpartition(":")
    if not sep or not host or not port.isdigit() or not (0 if bind else 1) <= int(port) < 65536:
        raise RendezvousError(f"tcp address {address!r} needs a host and a port 1-65535")
    return host.strip("[]"), int(port)


def bind_address(address: str) -> str:
    """The endpoint to bind for an advertised address: tcp host names become an IP."""
    if not address.startswith("tcp://"):
        return address
    host, port = split_host_port(address, bind=True)
    if host == "*":
        return address
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        ip = ipaddress.ip_address(resolve(host))
    return f"tcp://[{ip}]:{port}" if ip.version == 6 else f"tcp://{ip}:{port}"


def resolve(host: str) -> str:
    """One IP address of `host`, or a RendezvousError naming it."""
    try:
        return socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)[0][4][0]
    except OSError as exc:
        raise RendezvousError(f"cannot resolve host {host!r}: {exc}") from None


def route_to(host: str) -> str:
    """This host's IP on the route towards `host` (no packet is sent: UDP connect only)."""
    ip = resolve(host)
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect((ip, 9))
        except OSError as exc:
            raise RendezvousError(f"no route from this host to {host!r} ({ip}): {exc}") from None
        return probe.getsockname()[0]


def free_tcp_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """`count` distinct ports free on `host` now, drawn from below the kernel's ephemeral
    range where it leaves room: a port that bind(0) hands out can go to anyone's connect()
    or bind(0) before its peer binds it; one from below the range only to an explicit bind."""
    low = _ephemeral_low()
    # the system's randomness: a process that seeded `random` must not draw the same ports
    pool = random.SystemRandom().sample(range(EXPLICIT_PORTS, low),
                                        k=min(low - EXPLICIT_PORTS, 64 * count)) \
        if low - EXPLICIT_PORTS >= 1000 else []
    with contextlib.ExitStack() as stack:
        ports: list[int] = []
        for port in [*pool, *[0] * count]:
            probe = stack.enter_context(socket.socket())
            with contextlib.suppress(OSError):
                probe.bind((host, port))
                ports.append(probe.getsockname()[1])
                if len(ports) == count:
                    return ports
        raise RendezvousError(f"no {count} free tcp ports on {host}")


def _ephemeral_low() -> int:
    """The lowest port the kernel picks for bind(0) and connect() (Linux; else IANA's)."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 49152


def local_addresses(count: int, transport: str, directory: str) -> list[str]:
    """Addresses for `count` peers on this host: free tcp ports on loopback, or ipc socket
    files in `directory` (keep it short: a socket path holds at most 107 bytes)."""
    if transport == "ipc":
        return [f"ipc://{directory}/r{i}" for i in range(count)]
    if transport == "tcp":
        return [f"tcp://127.0.0.1:{port}" for port in free_tcp_ports(count)]
    raise RendezvousError(f"transport {transport!r} is not tcp or ipc")


def fresh(address: str, generation: int) -> str:
    """An address to bind beside `address` for the ring's `generation`-th re-forming: any
    free port on the same tcp host, or a sibling ipc path or inproc name."""
    if address.startswith("tcp://"):
        host, _ = split_host_port(address)
        return f"tcp://[{host}]:0" if ":" in host else f"tcp://{host}:0"
    return f"{re.sub(r'[.]g[0-9]+$', '', address)}.g{generation}"
