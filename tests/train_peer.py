"""Training for the gradient-averaging tests: one rank (`python train_peer.py MODE SEED OUT`,
under RINGLIB_* variables) or the whole batch in one process (reference()).

The model has a branch that only rank 0's shard uses and a layer no shard uses, so the
tests also cover parameters without gradients. Each rank saves its parameters to OUT.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

import ringlib
import ringlib.torch as rt

STEPS, BATCH, MICRO = 4, 12, 2   # 12 divides into 2 and 3 equal shards


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Linear(10, 32), torch.nn.Tanh(),
                                        torch.nn.Linear(32, 32), torch.nn.Tanh())
        self.head = torch.nn.Linear(32, 3)
        self.rank0_only = torch.nn.Linear(32, 3)
        self.unused = torch.nn.Linear(5, 5)
        self.register_buffer("seen", torch.zeros(1))

    def forward(self, x: torch.Tensor, shard: int) -> torch.Tensor:
        h = self.body(x)
        return self.head(h) + (self.rank0_only(h) if shard == 0 else 0)


def data(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(STEPS, BATCH, 10, generator=g), torch.randn(STEPS, BATCH, 3, generator=g)


def new_model(seed: int) -> Net:
    torch.manual_seed(seed)
    return Net()


def shard_loss(model: Net, x: torch.Tensor, y: torch.Tensor, shard: int) -> torch.Tensor:
    return ((model(x, shard) - y) ** 2).mean()


def reference(seed: int, world: int, mode: str) -> list[torch.Tensor]:
    """One process, whole batches: the loss is the mean of the shards' losses."""
    model = new_model(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=0.01)
    xs, ys = data(seed)
    size = BATCH // world
    for step in range(STEPS):
        for micro in range(MICRO if mode == "accumulate" else 1):
            parts = []
            for shard in range(world):
                x = xs[step, shard * size:(shard + 1) * size]
                y = ys[step, shard * size:(shard + 1) * size]
                parts.append(shard_loss(model, x[micro::MICRO] if mode == "accumulate" else x,
                                        y[micro::MICRO] if mode == "accumulate" else y, shard))
            torch.stack(parts).mean().backward()
        opt.step()
        opt.zero_grad()
    return [p.detach().clone() for p in model.parameters()]


def distributed(seed: int, mode: str) -> list[torch.Tensor]:
    with ringlib.init() as ring:
        model = new_model(seed + 1000 * ring.rank)  # different starting weights on purpose
        rt.broadcast_parameters(model, ring, root=0)
        compression = mode if mode in ("fp16", "bf16") else None
        averager = rt.GradientAverager(model, ring, bucket_mb=0.004, compression=compression)
        opt = rt.DistributedOptimizer(
            torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=0.01), averager)
        xs, ys = data(seed)
        size = BATCH // ring.world_size
        mine = slice(ring.rank * size, (ring.rank + 1) * size)
        for step in range(STEPS):
            x, y = xs[step, mine], ys[step, mine]
            if mode == "accumulate":
                with averager.no_sync():
                    (shard_loss(model, x[0::MICRO], y[0::MICRO], ring.rank)).backward()
                shard_loss(model, x[1::MICRO], y[1::MICRO], ring.rank).backward()
            else:
                shard_loss(model, x, y, ring.rank).backward()
            opt.step()
            opt.zero_grad()
        return [p.detach().clone() for p in model.parameters()]


if __name__ == "__main__":
    mode, seed, out = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
    params = distributed(seed, mode)
    rank = int(__import__("os").environ["RINGLIB_RANK"])
    torch.save(params, out / f"rank{rank}.pt")
    print(f"rank {rank} ok")
