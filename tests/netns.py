"""Namespaces for tests that need hosts of their own: network namespaces with `ip`
commands and veth pairs (root and iproute2; the fixtures that use them skip, saying so,
without), and mount namespaces with a /dev/shm of their own (root and unshare)."""

from __future__ import annotations

import os
import shutil
import subprocess

from ringlib.transport import segment_names


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


def namespaced(command: list[str]) -> list[str]:
    """`command` in a mount namespace of its own, with a /dev/shm of its own: another host,
    as far as shared memory goes."""
    script = f"mount -t tmpfs tmpfs {segment_names.DIRECTORY} && exec \"$@\""
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh", *command]


def can_unshare() -> bool:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return False
    probe = subprocess.run(namespaced(["true"]), capture_output=True)
    return probe.returncode == 0
