"""Ranks started as Kubeflow's training operator starts a PyTorchJob's pods: each pod its
own network namespace on one bridge, given only MASTER_ADDR (the master pod's service
name, which resolves inside the pods alone), MASTER_PORT, WORLD_SIZE and RANK (0 for the
master, worker i gets i + 1). The digits example trains on them as on torchrun."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from digits_harness import DIGITS, assert_follows_one_process
from netns import ip
from ringlib.runtime.environment import without_placement

MASTER = "digits-master-0"
PORT = 23456  # the operator's default; each pod is a fresh namespace, so it is free


@pytest.fixture
def pods():
    """Three pod namespaces, 10.N.M.10-12 on eth0, joined by a bridge in a node
    namespace; /etc/netns/POD/hosts names the master (ip netns exec mounts it)."""
    suffix = uuid.uuid4().hex[:5]
    node, names = f"k8s{suffix}n", [f"k8s{suffix}p{i}" for i in range(3)]
    subnet = f"10.{100 + int(suffix[:2], 16) % 100}.{int(suffix[2:4], 16)}"
    try:
        for name in [node, *names]:
            ip("netns", "add", name)
    except (OSError, subprocess.CalledProcessError) as exc:
        _remove([node, *names])
        pytest.skip(reason=f"cannot create network namespaces here ({exc}); needs root and iproute2")
    try:
        ip("-n", node, "link", "add", "br0", "type", "bridge")
        ip("-n", node, "link", "set", "br0", "up")
        for i, name in enumerate(names):
            ip("link", "add", f"v{suffix}{i}", "type", "veth", "peer", "name", f"w{suffix}{i}")
            ip("link", "set", f"v{suffix}{i}", "netns", name)
            ip("link", "set", f"w{suffix}{i}", "netns", node)
            ip("-n", node, "link", "set", f"w{suffix}{i}", "master", "br0", "up")
            ip("-n", name, "link", "set", f"v{suffix}{i}", "name", "eth0")
            ip("-n", name, "addr", "add", f"{subnet}.{10 + i}/24", "dev", "eth0")
            ip("-n", name, "link", "set", "eth0", "up")
            ip("-n", name, "link", "set", "lo", "up")
            etc = Path("/etc/netns") / name
            etc.mkdir(parents=True)
            (etc / "hosts").write_text(f"127.0.0.1 localhost\n{subnet}.10 {MASTER}\n")
        yield names
    finally:
        _remove([node, *names])


def _remove(names: list[str]) -> None:
    for name in names:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)
        shutil.rmtree(Path("/etc/netns") / name, ignore_errors=True)


def pytorchjob_env(rank: int) -> dict[str, str]:
    """What the training operator sets on a PyTorchJob's container, and nothing else of
    placement (the test's own environment may carry a launcher's)."""
    return {**without_placement(os.environ), "MASTER_ADDR": MASTER, "MASTER_PORT": str(PORT),
            "WORLD_SIZE": "3", "RANK": str(rank), "PYTHONUNBUFFERED": "1"}


def run_pods(names: list[str], *flags: str) -> list[subprocess.CompletedProcess]:
    procs = [subprocess.Popen(["ip", "netns", "exec", name, sys.executable, DIGITS,
                               "--epochs", "2", *flags], env=pytorchjob_env(rank),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for rank, name in enumerate(names)]
    deadline = time.monotonic() + 150
    try:
        done = []
        for p in procs:
            out, err = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            done.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
        return done
    finally:
        for p in procs:
            p.kill()
            p.wait()


@pytest.mark.timeout(300)
@pytest.mark.parametrize("flags", [["--backend", "ringlib"],
                                   pytest.param([], marks=pytest.mark.long)],
                         ids=["ddp-on-the-ringlib-backend", "ringlib-init"])
def test_a_pytorchjob_trains_with_the_master_known_only_by_name(pods, flags):
    with pytest.raises(OSError):
        socket.getaddrinfo(MASTER, PORT)  # outside the pods, the name means nothing
    master, *workers = run_pods(pods, *flags)
    for rank, done in enumerate([master, *workers]):
        assert done.returncode == 0, f"rank {rank}: {done.stderr[-3000:]}"
    assert "(3 peers)" in master.stdout and not any(w.stdout for w in workers)
    assert_follows_one_process(master.stdout, 2)
