"""Network namespaces for tests that need hosts of their own: `ip` commands and veth
pairs (root and iproute2; the fixtures that use them skip, saying so, without)."""

from __future__ import annotations

import subprocess


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


def veth(names: list[str], pair: str, subnet: str, device: str | None = None) -> None:
    """Join namespaces names[0] and names[1] by a veth pair (PAIRa, PAIRb), at SUBNET.1 and
    SUBNET.2, its ends renamed `device` in both where given."""
    ip("link", "add", f"{pair}a", "type", "veth", "peer", "name", f"{pair}b")
    for end, name in zip("ab", names):
        here = device or f"{pair}{end}"
        ip("link", "set", f"{pair}{end}", "netns", name)
        if device:
            ip("-n", name, "link", "set", f"{pair}{end}", "name", device)
        ip("-n", name, "addr", "add", f"{subnet}.{1 + (end == 'b')}/24", "dev", here)
        ip("-n", name, "link", "set", here, "up")
