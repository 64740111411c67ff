"""Hosts for the network-fault benchmark: one network namespace per rank, joined at a hub
namespace, and a way to put faults (delay, loss) on every rank's link and take them off.

Each rank's address, 10.213.0.N, sits on its `lo`; a veth pair, `eth0` in the rank's
namespace, joins it to a Linux bridge in the hub, and the subnet's route goes out of
eth0: the clean link. Faults come one of two ways, by what the kernel has:
  netem   `tc qdisc replace dev eth0 root netem delay D loss L` in each rank's namespace
  switch  a tap per rank, `tap0`, on a user-space switch in the hub (netem_switch.py)
          that applies the same faults to each frame a rank sends; the subnet's route
          moves to tap0 while faults are on (for kernels without netem, as on this
          project's VMs)
Everything lives in namespaces named `rl-PID-TAG-...`; deleting them deletes the bridge,
veths and taps too, so `close()` leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from typing import Iterator, Protocol

SUBNET = "10.213.0"
DEVICE = "eth0"             # each rank's veth, inside its own namespace
TAP = "tap0"                # each rank's port on the switch, inside its own namespace
LINKS = ("netem", "switch")
SWITCH_TIMEOUT_S = 10.0


class HostsError(RuntimeError):
    """A namespace, link or fault could not be set up; the message names the command."""


@dataclass(frozen=True)
class Faults:
    delay_s: float
    loss: float             # a fraction: 0.01 is 1%

    def netem_args(self) -> list[str]:
        """The arguments of `tc qdisc ... netem` that make these faults."""
        return ["delay", f"{self.delay_s * 1000:g}ms", "loss", f"{self.loss * 100:g}%"]


def ip(*args: str) -> str:
    """Run `ip ARGS`; raise HostsError with its message if it fails."""
    return _run(["ip", *args])


def _run(command: list[str]) -> str:
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise HostsError(f"`{' '.join(command)}` failed: {done.stderr.strip()}")
    return done.stdout


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold SIGINT and SIGTERM until the block ends, so that a second Ctrl-C cannot cut a
    clean-up short; they are delivered after it."""
    held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)


def unsupported() -> str | None:
    """Why namespaces cannot be made here, or None if they can."""
    if os.geteuid() != 0:
        return "the network-fault benchmark must run as root (it creates network namespaces)"
    if shutil.which("ip") is None or shutil.which("tc") is None:
        return "`ip` and `tc` are missing (Debian: apt-get install iproute2)"
    done = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
    if done.returncode != 0:
        return f"`ip netns` is unavailable: {done.stderr.strip()}"
    return None


def has_netem(namespace: str) -> bool:
    """Whether this kernel has the netem qdisc: tried on `lo` in a scratch namespace."""
    done = subprocess.run(["tc", "-n", namespace, "qdisc", "add", "dev", "lo", "root",
                           "netem", "delay", "1ms"], capture_output=True, text=True)
    subprocess.run(["tc", "-n", namespace, "qdisc", "del", "dev", "lo", "root"],
                   capture_output=True)
    return done.returncode == 0


def _link_kind(link: str, scratch: str) -> str:
    """"netem" or "switch" for `link` (or "auto"); refuse netem where the kernel lacks it."""
    if link not in (*LINKS, "auto"):
        raise HostsError(f"unknown link {link!r}: want one of {', '.join(LINKS)} or auto")
    if link == "switch":
        return link
    if has_netem(scratch):
        return "netem"
    if link == "netem":
        raise HostsError("this kernel has no netem qdisc (CONFIG_NET_SCH_NETEM is off or its "
                         "module is missing); use --link switch, or auto")
    return "switch"


class Link(Protocol):
    """How faults reach every rank's link; `None` is the clean kernel link."""

    kind: str

    def set_faults(self, faults: Faults | None) -> None: ...
    def loss_counts(self) -> tuple[int, int]: ...
    def close(self) -> None: ...


class Hosts:
    """`ranks` namespaces and a hub joined by a bridge, with faults by `link` ("netem",
    "switch", or "auto": netem where the kernel has it). Use as a context manager: the
    namespaces go at exit."""

    def __init__(self, ranks: int, link: str = "auto", seed: int = 0) -> None:
        tag = f"rl-{os.getpid()}-{secrets.token_hex(2)}"
        self.hub = f"{tag}-hub"
        self.names = [f"{tag}-{i}" for i in range(ranks)]
        self.addresses = [f"{SUBNET}.{i + 1}" for i in range(ranks)]
        self.link: Link | None = None
        self._made: list[str] = []
        try:
            for name in [self.hub, *self.names]:
                ip("netns", "add", name)
                self._made.append(name)
            kind = _link_kind(link, self.hub)
            self._bridge()
            self.link = NetemLink(self) if kind == "netem" else SwitchLink(self, seed)
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> Hosts:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _bridge(self) -> None:
        """The clean link: each rank's address on its lo, routed out of a veth to br0."""
        ip("-n", self.hub, "link", "add", "br0", "type", "bridge")
        ip("-n", self.hub, "link", "set", "br0", "up")
        for i, (name, address) in enumerate(zip(self.names, self.addresses)):
            ip("-n", self.hub, "link", "add", f"rank{i}", "type", "veth",
               "peer", "name", DEVICE, "netns", name)
            ip("-n", self.hub, "link", "set", f"rank{i}", "master", "br0", "up")
            ip("-n", name, "link", "set", "lo", "up")
            ip("-n", name, "addr", "add", f"{address}/32", "dev", "lo")
            ip("-n", name, "link", "set", DEVICE, "up")
        self.route_via(DEVICE)

    def route_via(self, device: str) -> None:
        """Send every rank's traffic to the subnet out of `device` (eth0 or tap0)."""
        for name, address in zip(self.names, self.addresses):
            ip("-n", name, "route", "replace", f"{SUBNET}.0/24", "dev", device,
               "src", address)

    def close(self) -> None:
        """Stop the link and delete every namespace made, even after a partial set-up."""
        with signals_deferred():
            if self.link is not None:
                self.link.close()
                self.link = None
            for name in reversed(self._made):
                subprocess.run(["ip", "netns", "del", name], capture_output=True)
            self._made.clear()


class NetemLink:
    """Faults as a netem qdisc on each rank's eth0 (its way out), removed for None."""

    kind = "netem"

    def __init__(self, hosts: Hosts) -> None:
        self.hosts = hosts

    def set_faults(self, faults: Faults | None) -> None:
        for name in self.hosts.names:
            if faults is None:
                subprocess.run(["tc", "-n", name, "qdisc", "del", "dev", DEVICE, "root"],
                               capture_output=True)  # absent already is fine
            else:
                _run(["tc", "-n", name, "qdisc", "replace", "dev", DEVICE, "root", "netem",
                      *faults.netem_args()])

    def loss_counts(self) -> tuple[int, int]:
        """(packets sent, packets dropped) by the netem qdiscs since they were put on."""
        sent = dropped = 0
        for name in self.hosts.names:
            for qdisc in json.loads(_run(["tc", "-n", name, "-s", "-j", "qdisc", "show",
                                          "dev", DEVICE])):
                if qdisc.get("kind") == "netem":
                    sent += qdisc.get("packets", 0) + qdisc.get("drops", 0)
                    dropped += qdisc.get("drops", 0)
        return sent, dropped

    def close(self) -> None:
        """Nothing of its own: the qdiscs go with the namespaces."""


class SwitchLink:
    """netem_switch.py in the hub, its taps moved into the ranks' namespaces as tap0; with
    faults (even none: Faults(0, 0) measures the switch itself) the traffic goes through
    it, and for None back over the veths."""

    kind = "switch"

    def __init__(self, hosts: Hosts, seed: int) -> None:
        self.hosts = hosts
        self.process = subprocess.Popen(
            ["ip", "netns", "exec", hosts.hub, sys.executable, "-m", "ringlib.bench.netem_switch",
             str(len(hosts.names)), "--seed", str(seed)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            start_new_session=True)  # Ctrl-C reaches the benchmark, which ends the switch
        try:
            if self._reply() != "ready":
                raise HostsError(f"the switch did not start: {self._stderr()}")
            for i, name in enumerate(hosts.names):
                ip("-n", hosts.hub, "link", "set", f"port{i}", "netns", name)
                ip("-n", name, "link", "set", f"port{i}", "name", TAP)
                ip("-n", name, "link", "set", TAP, "up")
        except BaseException:
            self.close()
            raise

    def _reply(self) -> str:
        assert self.process.stdout is not None
        line = self.process.stdout.readline().strip()
        if not line:
            raise HostsError(f"the switch exited (code {self.process.poll()}): {self._stderr()}")
        return line

    def _stderr(self) -> str:
        assert self.process.stderr is not None
        if self.process.poll() is None:
            return "(still running)"
        return self.process.stderr.read().strip()[-2000:]

    def _ask(self, command: str) -> dict:
        assert self.process.stdin is not None
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()
        reply = json.loads(self._reply())
        if "error" in reply:
            raise HostsError(f"the switch refused {command!r}: {reply['error']}")
        return reply

    def set_faults(self, faults: Faults | None) -> None:
        if faults is None:
            self.hosts.route_via(DEVICE)
            self._ask("faults 0 0")
        else:
            self._ask(f"faults {faults.delay_s!r} {faults.loss!r}")
            self.hosts.route_via(TAP)

    def loss_counts(self) -> tuple[int, int]:
        """(frames sent, frames dropped) through the switch since faults were last set."""
        reply = self._ask("stats")
        return reply["frames"], reply["dropped"]

    def close(self) -> None:
        """End the switch: closing its stdin ends it; kill it if it lingers."""
        try:
            self.process.communicate(input="", timeout=SWITCH_TIMEOUT_S)
        except (subprocess.TimeoutExpired, OSError, ValueError):
            self.process.kill()
            self.process.wait()
