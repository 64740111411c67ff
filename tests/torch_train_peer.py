"""Unmodified torch trainers on the ringlib backend, one rank under torchrun:
`python torch_train_peer.py MODE SEED OUT`, MODE one of

    ddp    every DistributedDataParallel variant in VARIANTS, one after another
    fsdp   FSDP2 (fully_shard on a CPU device mesh)
    kill   DDP, where the last rank SIGKILLs itself in its third backward pass

Each rank trains its shard of every batch and writes OUT/rank{R}.json: for ddp and fsdp,
"ok" or what went wrong per variant (parameters equal to one process training on the
whole batch, reference(), and bit-identical across ranks); for kill, what each survivor's
backward raised and how long it took.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel as DDP

import ringlib.torch as rt  # registers the backend

STEPS, BATCH, MICRO = 4, 12, 2   # 12 splits into 2 and 3 equal shards
VARIANTS = ["default", "find_unused_parameters", "static_graph", "gradient_as_bucket_view",
            "python_comm_hook", "fp16_compress_hook", "no_sync"]
TOLERANCE = {"fp16_compress_hook": 2e-3}
# Beside DDP in the ddp mode: ringlib.torch's own GradientAverager on the same group.
AVERAGER = "gradient_averager_on_the_group"


SPARE = {"find_unused_parameters": "varying", "static_graph": "fixed"}


class Net(torch.nn.Module):
    """An MLP; with `spare` "fixed", a layer never used too, and with "varying" also a
    head used on even steps only."""

    def __init__(self, spare: str = "") -> None:
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Linear(10, 32), torch.nn.Tanh(),
                                        torch.nn.Linear(32, 32), torch.nn.Tanh())
        self.head = torch.nn.Linear(32, 3)
        self.varying = spare == "varying"
        if spare:
            self.unused = torch.nn.Linear(5, 5)
        if self.varying:
            self.even_head = torch.nn.Linear(32, 3)

    def forward(self, x: torch.Tensor, step: int = 1) -> torch.Tensor:
        h = self.body(x)
        return self.head(h) + (self.even_head(h) if self.varying and step % 2 == 0 else 0)


def data(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(STEPS, MICRO, BATCH, 10, generator=g),
            torch.randn(STEPS, MICRO, BATCH, 3, generator=g))


def new_model(seed: int, spare: str = "") -> Net:
    torch.manual_seed(seed)
    return Net(spare)


def optimizer(params) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.05, momentum=0.9)


def micro_batches(variant: str) -> int:
    return MICRO if variant == "no_sync" else 1


def reference(seed: int, spare: str, micro: int) -> list[torch.Tensor]:
    """One process, whole batches; with micro-batches, their gradients add up."""
    model = new_model(seed, spare)
    opt = optimizer(model.parameters())
    xs, ys = data(seed)
    for step in range(STEPS):
        for m in range(micro):
            ((model(xs[step, m], step) - ys[step, m]) ** 2).mean().backward()
        opt.step()
        opt.zero_grad()
    return [p.detach().clone() for p in model.parameters()]


def shard(t: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    size = BATCH // world
    return t[rank * size:(rank + 1) * size]


def wrap(model: Net, variant: str) -> DDP:
    options = {"find_unused_parameters": {"find_unused_parameters": True},
               "static_graph": {"static_graph": True},
               "gradient_as_bucket_view": {"gradient_as_bucket_view": True,
                                           "bucket_cap_mb": 0.001}}.get(variant, {})
    ddp = DDP(model, **options)
    if variant == "python_comm_hook":
        ddp.register_comm_hook(None, default_hooks.allreduce_hook)
    elif variant == "fp16_compress_hook":
        ddp.register_comm_hook(None, default_hooks.fp16_compress_hook)
    return ddp


def train(model: torch.nn.Module, opt: Any, seed: int, micro: int = 1,
          no_sync: Callable[[], Any] = contextlib.nullcontext) -> list[torch.Tensor]:
    """Train on this rank's shard of every step's batch, in `micro` micro-batches, all
    but the last inside `no_sync()`; return the parameters."""
    rank, world = dist.get_rank(), dist.get_world_size()
    xs, ys = data(seed)
    for step in range(STEPS):
        for m in range(micro):
            x, y = shard(xs[step, m], rank, world), shard(ys[step, m], rank, world)
            with no_sync() if m < micro - 1 else contextlib.nullcontext():
                ((model(x, step) - y) ** 2).mean().backward()
        opt.step()
        opt.zero_grad()
    return [p.detach().clone() for p in model.parameters()]


def train_ddp(seed: int, variant: str) -> list[torch.Tensor]:
    # Ranks start apart: DDP broadcasts rank 0's parameters.
    ddp = wrap(new_model(seed + dist.get_rank(), SPARE.get(variant, "")), variant)
    return train(ddp, optimizer(ddp.parameters()), seed, micro_batches(variant), ddp.no_sync)


def train_averaged(seed: int) -> list[torch.Tensor]:
    model = new_model(seed + dist.get_rank())
    rt.broadcast_parameters(model, dist.group.WORLD, root=0)
    averager = rt.GradientAverager(model, dist.group.WORLD, bucket_mb=0.001)
    return train(model, rt.DistributedOptimizer(optimizer(model.parameters()), averager), seed)


def train_fsdp(seed: int) -> list[torch.Tensor]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    model = new_model(seed)
    for layer in model.body:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    train(model, optimizer(model.parameters()), seed)
    return [p.full_tensor().detach().clone() for p in model.parameters()]


def check(params: list[torch.Tensor], want: list[torch.Tensor], tolerance: float) -> None:
    """Equal to one process, and bit-identical to every other rank."""
    for i, (got, ref) in enumerate(zip(params, want, strict=True)):
        assert torch.allclose(got, ref, rtol=tolerance, atol=tolerance), \
            f"parameter {i} is {(got - ref).abs().max():.3g} away from one process's"
    flat = torch.cat([p.reshape(-1) for p in params])
    everyone = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(everyone, flat)
    for rank, other in enumerate(everyone):
        assert torch.equal(other, flat), f"rank {rank}'s parameters differ from this rank's"


def run_checks(seed: int, mode: str) -> dict[str, str]:
    results = {}
    for variant in [*VARIANTS, AVERAGER] if mode == "ddp" else ["fsdp"]:
        print(variant, file=sys.stderr, flush=True)
        try:
            if mode == "fsdp":
                check(train_fsdp(seed), reference(seed, "", 1), 1e-5)
            elif variant == AVERAGER:
                check(train_averaged(seed), reference(seed, "", 1), 1e-5)
            else:
                check(train_ddp(seed, variant),
                      reference(seed, SPARE.get(variant, ""), micro_batches(variant)),
                      TOLERANCE.get(variant, 1e-5))
            results[variant] = "ok"
        except Exception:
            results[variant] = traceback.format_exc()
    return results


def killed_mid_backward(seed: int) -> dict[str, object]:
    """The last rank dies in its third backward pass; the others report what they saw."""
    rank, world = dist.get_rank(), dist.get_world_size()
    model = new_model(seed)
    ddp = DDP(model, bucket_cap_mb=0.001)  # several buckets: it dies between them
    xs, ys = data(seed)
    for step in range(STEPS):
        if step == 2 and rank == world - 1:
            model.body[0].weight.register_hook(lambda g: os.kill(os.getpid(), signal.SIGKILL))
        loss = ((ddp(shard(xs[step, 0], rank, world)) - shard(ys[step, 0], rank, world)) ** 2)
        start = time.monotonic()
        try:
            loss.mean().backward()
        except Exception as exc:
            return {"step": step, "raised": type(exc).__name__, "message": str(exc),
                    "seconds": time.monotonic() - start}
    return {"step": STEPS, "raised": None}


def main() -> None:
    mode, seed, out = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
    dist.init_process_group("ringlib")
    rank = dist.get_rank()
    results = killed_mid_backward(seed) if mode == "kill" else run_checks(seed, mode)
    (out / f"rank{rank}.json").write_text(json.dumps(results))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
