"""One process of an elastic test: `python elastic_peer.py SCENARIO SEED [NAME]`, with
RINGLIB_* set (RINGLIB_JOIN for a newcomer). NAME tells the processes apart across
changes of rank.

train: 3 members train a small torch model with GradientAverager under run_elastic; at
    step JOIN_AT - 1 they wait until a newcomer asked, which is admitted after it and
    takes the members' state; at KILL_AT the process named "victim" SIGKILLs itself and the
    other 3 re-form and finish. Every step, each rank checks the averaged gradients
    against the float64 mean of every rank's batch. Each prints its digest of the
    parameters at KILL_AT - 1 (4 ranks) and at the end (3 ranks).
refused: members admit() for a few seconds, and nobody is admitted; the newcomer
    (another key) prints what init() raised.
dies: the newcomer SIGKILLs itself once welcomed, before it meets the ring; the members'
    admit() raises, and their ring goes on as it was (an all-reduce checked against
    float64).
two: two newcomers ask two different members at once; the members wait until both have
    asked, admit both, and every rank of the 5 prints the ring's table.
replace: a newcomer asks; then the member named "victim" SIGKILLs itself, and the
    survivors' reform() both drops it and lets the newcomer in.
"""

from __future__ import annotations

import hashlib
import logging
import os
import signal
import sys
import time

import numpy as np

import ringlib

JOIN_AT, KILL_AT, STEPS = 4, 9, 14
BATCH, FEATURES = 8, 6


def digest(model) -> str:
    return hashlib.sha256(b"".join(p.detach().numpy().tobytes()
                                   for p in model.parameters())).hexdigest()[:16]


def batch(seed: int, step: int, rank: int):
    rng = np.random.default_rng([seed, step, rank])
    return (rng.standard_normal((BATCH, FEATURES)), rng.standard_normal((BATCH, 2)))


def reference_grads(model, seed: int, step: int, world: int) -> list[np.ndarray]:
    """The float64 mean over `world` ranks' batches of the loss's gradients."""
    import torch
    ref = [np.zeros(p.shape) for p in model.parameters()]
    w, b = (p.detach().double() for p in model.parameters())
    for rank in range(world):
        x, y = (torch.from_numpy(t) for t in batch(seed, step, rank))
        w64, b64 = w.clone().requires_grad_(), b.clone().requires_grad_()
        ((x @ w64.T + b64 - y) ** 2).mean().backward()
        ref[0] += w64.grad.numpy() / world
        ref[1] += b64.grad.numpy() / world
    return ref


def wait_for_newcomers(ring, count: int) -> None:
    """Until the members together heard `count` newcomers (a collective loop)."""
    while ring.all_reduce(np.array([ring.waiting()], np.int64), op="sum")[0] < count:
        time.sleep(0.05)


def train(seed: int, name: str) -> None:
    import torch
    import ringlib.torch as rt
    torch.manual_seed(seed)
    ring = ringlib.init()
    model = torch.nn.Linear(FEATURES, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    averager = rt.GradientAverager(model, ring)
    state = rt.ElasticState(model, optimizer)

    def step(state: rt.ElasticState) -> None:
        if state.step == JOIN_AT - 1 and ring.world_size == 3:
            wait_for_newcomers(ring, 1)
        if state.step == KILL_AT:
            if ring.world_size == 4:
                print(f"step {state.step} world 4 digest {digest(model)}", flush=True)
            if name == "victim":
                os.kill(os.getpid(), signal.SIGKILL)
        x, y = (torch.from_numpy(t).float() for t in batch(seed, state.step, ring.rank))
        ref = reference_grads(model, seed, state.step, ring.world_size)
        ((model(x) - y) ** 2).mean().backward()
        averager.synchronize()
        for p, r in zip(model.parameters(), ref):
            err = np.abs(p.grad.double().numpy() - r).max()
            assert err < 1e-5, f"seed {seed} step {state.step}: gradient off by {err}"
        optimizer.step()
        optimizer.zero_grad()

    rt.run_elastic(step, ring, state, STEPS, admit_every=1, timeout=20)
    print(f"end {name} rank {ring.rank} world {ring.world_size} generation {ring.generation} "
          f"digest {digest(model)}", flush=True)
    ring.close()


def refused(seed: int, name: str) -> None:
    if name == "newcomer":
        try:
            ringlib.init(timeout=4)
        except ringlib.RendezvousTimeout as exc:
            print(f"refused: {exc}", flush=True)
        return
    with ringlib.init() as ring:
        for _ in range(50):  # 5 s and more: the newcomer gives up after 4
            assert ring.admit(timeout=10) == 0
            time.sleep(0.1)
        print(f"admitted none, waiting {ring.waiting()} world {ring.world_size}", flush=True)


def dies(seed: int, name: str) -> None:
    if name == "newcomer":
        from ringlib.runtime import admission

        async def die(*args, **kwargs):
            os.kill(os.getpid(), signal.SIGKILL)
        admission.join = die  # welcomed, then dead before a word to the ring
        ringlib.init(timeout=20)
        return
    with ringlib.init() as ring:
        wait_for_newcomers(ring, 1)
        try:
            ring.admit(timeout=3)
        except ringlib.RendezvousError as exc:
            print(f"admit raised {type(exc).__name__}: {exc}", flush=True)
        x = np.random.default_rng([seed, ring.rank]).standard_normal(1000)
        total = sum(np.random.default_rng([seed, r]).standard_normal(1000)
                    for r in range(ring.world_size))
        out = ring.all_reduce(x.copy())
        assert np.allclose(out, total, rtol=1e-12), f"seed {seed}: wrong all-reduce"
        print(f"intact world {ring.world_size} generation {ring.generation} "
              f"waiting {ring.waiting()}", flush=True)


def two(seed: int, name: str) -> None:
    ring = ringlib.init(timeout=30)
    if not name.startswith("newcomer"):
        wait_for_newcomers(ring, 2)
        assert ring.admit(timeout=20) == 2
    out = ring.all_reduce(np.array([float(ring.rank)]))
    assert out[0] == sum(range(ring.world_size)), f"seed {seed}: {out}"
    print(f"{name} rank {ring.rank} table {','.join(ring.peers)}", flush=True)
    ring.close()


def replace(seed: int, name: str) -> None:
    if name == "newcomer":
        ring = ringlib.init(timeout=30)
    else:
        ring = ringlib.init()
        wait_for_newcomers(ring, 1)
        if name == "victim":
            os.kill(os.getpid(), signal.SIGKILL)
        try:
            ring.all_reduce(np.ones(4))
        except ringlib.PeerLost:
            ring.reform(timeout=20)  # drops the victim, lets the newcomer in
    out = ring.all_reduce(np.array([float(ring.rank)]))
    assert out[0] == sum(range(ring.world_size)), f"seed {seed}: {out}"
    print(f"{name} rank {ring.rank} world {ring.world_size} generation {ring.generation} "
          f"table {','.join(ring.peers)}", flush=True)
    ring.close()


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(name)s %(levelname)s %(message)s")
    scenario, seed = sys.argv[1], int(sys.argv[2])
    globals()[scenario](seed, sys.argv[3] if len(sys.argv) > 3 else "member")
