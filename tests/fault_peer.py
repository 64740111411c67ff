"""One rank of a fault test: `python fault_peer.py SCENARIO SEED`, with RINGLIB_* set.

train: every rank trains a linear model by all-reducing gradients, through the blocking
    facade (ringlib.init) as a training loop would; rank VICTIM kills itself (SIGKILL) at
    step KILL_AT. The survivors get PeerLost, re-form a ring of three, take the parameters
    and step from the new rank 0 and finish. Each prints its new rank, world size, when it
    got PeerLost and a digest of its parameters.
stall: rank 1 stops itself (SIGSTOP) after a few collectives, as a hung process or a cut
    network looks; the others print how long until PeerLost named it, and rank 0 then
    wakes it (SIGCONT): it learns that it is out of the ring, and cannot re-form.
busy: rank 1 blocks its event loop for longer than the peer timeout between collectives;
    its heartbeats still flow, and every collective completes.
across: 4 ranks on 2 hosts (by their addresses) run hierarchical all-reduces; rank 3, on
    the second host, SIGKILLs itself as its third one enters the phase between the hosts.
    The others print how long until PeerLost, and what it says.
cut: 3 ranks over tcp alone run all-reduces small enough for the direct links; after a
    few, every rank kills the connections its direct-link listener accepted (ss -K), while
    the others may be sending on them. Each checks every result against float64 and prints
    how many links it cut, then "done".
meshcut: 3 ranks over tcp alone, shared memory off, so small all-reduces take the mesh;
    after a few, rank 0 kills its mesh connection to rank 1 (ss -K). Every rank prints
    what its next all-reduces raised, and when.
startup: rank VICTIM binds its address, as a rank starting up does, and is SIGKILLed
    before it says a word; the others print what connect() raised, and when.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import subprocess
import sys
import time

import numpy as np

import ringlib

VICTIM, KILL_AT, STEPS = 2, 15, 40


def gradient(w: np.ndarray, rank: int, step: int, seed: int) -> np.ndarray:
    """The gradient of a least-squares loss on this rank's batch for this step."""
    rng = np.random.default_rng([seed, rank, step])
    a = rng.standard_normal((16, w.size)).astype(np.float32)
    b = rng.standard_normal(16).astype(np.float32)
    return a.T @ (a @ w - b) / 16


def train(seed: int) -> None:
    with ringlib.init() as ring:
        w = np.zeros(256, np.float32)
        ring.broadcast(w)
        step, lost_after = 0, None
        while step < STEPS:
            if ring.generation == 0 and ring.rank == VICTIM and step == KILL_AT:
                print(f"killed {time.time()}", flush=True)
                os.kill(os.getpid(), signal.SIGKILL)
            try:
                g = ring.all_reduce(gradient(w, ring.rank, step, seed), op="mean")
            except ringlib.PeerLost as exc:
                lost_after = time.time()
                print(f"lost {exc.rank} {exc.address} at {lost_after}: {exc}", flush=True)
                ring.reform()
                ring.broadcast(w)
                step = int(ring.broadcast(np.array([step], np.int64))[0])
                continue
            w -= 0.05 * g
            step += 1
        print(f"rank {ring.rank} of {ring.world_size} lost_at {lost_after} "
              f"digest {hashlib.sha256(w.tobytes()).hexdigest()}", flush=True)


async def stall(seed: int) -> None:
    async with ringlib.connect() as ring:
        pids = await ring.all_gather(np.array([os.getpid()]))
        x = np.ones(1000, np.float32)
        for _ in range(3):
            await ring.all_reduce(x)
        if ring.rank == 1:
            os.kill(os.getpid(), signal.SIGSTOP)
        start = time.monotonic()
        try:  # woken, rank 1 may still finish the collective that the others gave up
            for _ in range(2 if ring.rank == 1 else 1):
                await ring.all_reduce(x)
        except ringlib.PeerLost as exc:
            print(f"lost {exc.rank} after {time.monotonic() - start:.2f} s: {exc}", flush=True)
            if ring.rank == 0:
                os.kill(int(pids[1][0]), signal.SIGCONT)
            elif ring.rank == 1:
                try:
                    await ring.reform(timeout=10)
                except ringlib.RendezvousTimeout as left_out:
                    print(f"left out: {left_out}", flush=True)
            return
        sys.exit("the stalled rank was never reported lost")


async def across(seed: int) -> None:
    from ringlib.collectives import hierarchical_allreduce as hierarchical

    async with ringlib.connect() as ring:
        assert ring.plan("all_reduce", 1 << 22).algorithm == "hierarchical"
        calls, inter_host = [0], hierarchical.ring_allreduce

        async def dies_the_third_time(ch, *args):
            calls[0] += 1
            if ring.rank == 3 and calls[0] == 3:
                os.kill(os.getpid(), signal.SIGKILL)
            return await inter_host(ch, *args)
        hierarchical.ring_allreduce = dies_the_third_time
        x = np.random.default_rng(seed).standard_normal(1 << 20).astype(np.float32)
        for _ in range(2):
            await ring.all_reduce(x)
        start = time.monotonic()
        try:
            await ring.all_reduce(x)
        except ringlib.PeerLost as exc:
            print(f"lost {exc.rank} after {time.monotonic() - start:.2f} s: {exc}", flush=True)
            return
        sys.exit("the killed rank was never reported lost")


async def busy(seed: int) -> None:
    async with ringlib.connect() as ring:
        for i in range(5):
            if ring.rank == 1 and i == 2:
                time.sleep(float(os.environ["RINGLIB_PEER_TIMEOUT"]) * 2)  # the loop stalls
            x = np.full(1000, ring.rank + i, np.float32)
            await ring.all_reduce(x)
            expected = sum(range(ring.world_size)) + ring.world_size * i
            assert np.all(x == expected), (i, x[:4], expected)
        print("done", flush=True)


async def cut(seed: int) -> None:
    async with ringlib.connect() as ring:
        port = ring._endpoint.direct.listener.address.rsplit(":", 1)[1]
        for i in range(300):
            parts = [np.random.default_rng([seed, i, r]).standard_normal(16384)
                     for r in range(ring.world_size)]
            if i == 100:
                killed = subprocess.run(["ss", "-K", "state", "established", "sport", "=",
                                         f":{port}"], capture_output=True, text=True, check=True)
                print(f"cut {killed.stdout.count(chr(10)) - 1}", flush=True)
            x = parts[ring.rank].astype(np.float32)
            await ring.all_reduce(x)
            expected = np.sum([p.astype(np.float32).astype(np.float64) for p in parts], axis=0)
            assert np.allclose(x, expected, rtol=1e-5, atol=1e-5), (i, seed)
        print("done", flush=True)


async def meshcut(seed: int) -> None:
    async with ringlib.connect() as ring:
        assert ring.plan("all_reduce", 8).algorithm == "mesh"
        x = np.ones(2, np.float32)
        for _ in range(20):
            await ring.all_reduce(x)
        if ring.rank == 0:
            port = ring._mesh.mesh.links[1].sock.getsockname()[1]
            subprocess.run(["ss", "-K", "sport", "=", f":{port}"], check=True,
                           capture_output=True)
        start = time.monotonic()
        try:
            for _ in range(100):
                await ring.all_reduce(x)
                await asyncio.sleep(0.01)
        except ringlib.PeerLost as exc:
            print(f"lost {exc.rank} after {time.monotonic() - start:.2f} s: {exc}", flush=True)
        else:
            sys.exit("the cut link was never noticed")
        try:
            await ring.all_reduce(np.ones(100_000, np.float32))  # messages: the ring is broken
        except ringlib.PeerLost:
            print("then PeerLost on messages too", flush=True)


def startup(seed: int) -> None:
    rank = int(os.environ["RINGLIB_RANK"])
    if rank == VICTIM:
        import zmq

        pull = zmq.Context().socket(zmq.PULL)
        pull.bind(os.environ["RINGLIB_PEERS"].split(",")[rank])
        time.sleep(3)  # the others are up and connect to it meanwhile
        os.kill(os.getpid(), signal.SIGKILL)
    start = time.monotonic()
    try:
        ringlib.init(timeout=60)
    except ringlib.RingError as exc:
        print(f"{type(exc).__name__} after {time.monotonic() - start:.2f} s: {exc}", flush=True)
        return
    sys.exit("the ring formed without the killed rank")


if __name__ == "__main__":
    scenario, seed = sys.argv[1], int(sys.argv[2])
    if scenario == "train":
        train(seed)
    elif scenario == "startup":
        startup(seed)
    else:
        asyncio.run({"stall": stall, "busy": busy, "across": across, "cut": cut,
                     "meshcut": meshcut}[scenario](seed))
