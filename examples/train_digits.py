"""Data-parallel training of a small classifier on scikit-learn's bundled digits.

    ringlib launch -n 2 -- python examples/train_digits.py     # 2 peers, a shard each
    python examples/train_digits.py                            # one process: the same run
    torchrun --nproc-per-node 2 examples/train_digits.py --backend ringlib

Every step takes the same global batch of 60 images; each rank trains on its share, and
the gradients are averaged, so the peers follow the single process's path and reach its
accuracy: by ringlib.torch's GradientAverager on ringlib's own ring, or, with --backend,
by torch's unmodified DistributedDataParallel on that torch.distributed backend
("ringlib", or "gloo" to compare). Rank 0 prints the loss and the test accuracy after
each epoch.
"""

from __future__ import annotations

import argparse
import contextlib
from typing import Callable, Iterator

import torch
import torch.distributed as dist
from sklearn.datasets import load_digits

import ringlib
import ringlib.torch as rt


def dataset(seed: int) -> tuple[torch.Tensor, ...]:
    """Scaled 8x8 digits, split 1500 for training and the rest for testing, by seed."""
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    train, test = order[:1500], order[1500:]
    return x[train], y[train], x[test], y[test]


def new_model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)  # ranks start apart; the first broadcast aligns them
    return torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(),
                               torch.nn.Linear(128, 10))


Trainer = tuple[int, int, torch.nn.Module, torch.optim.Optimizer,
                Callable[[torch.Tensor], torch.Tensor]]


@contextlib.contextmanager
def ringlib_trainer(seed: int) -> Iterator[Trainer]:
    """(rank, world size, model, optimizer, mean over ranks) on ringlib's own ring."""
    with ringlib.init() as ring:
        model = new_model(seed + ring.rank)
        rt.broadcast_parameters(model, ring, root=0)
        averager = rt.GradientAverager(model, ring)
        optimizer = rt.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1,
                                                            momentum=0.9), averager)
        yield ring.rank, ring.world_size, model, optimizer, lambda t: ring.all_reduce(t, "mean")


@contextlib.contextmanager
def ddp_trainer(seed: int, backend: str) -> Iterator[Trainer]:
    """The same with torch's DistributedDataParallel, on a torch.distributed backend."""
    dist.init_process_group(backend)
    try:
        yield ddp_parts(seed)
    finally:
        dist.destroy_process_group()


def ddp_parts(seed: int) -> Trainer:
    """DistributedDataParallel's trainer in a process group that is already up (under
    torchrun after init_process_group, or as Ray Train starts its workers)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    model = torch.nn.parallel.DistributedDataParallel(new_model(seed + rank))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)

    def mean(t: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(t)  # Gloo has no AVG
        return t / world
    return rank, world, model, optimizer, mean


def fit(trainer: Trainer, epochs: int, batch: int, seed: int) -> float:
    """Train for `epochs`, each rank on its share of every global batch; rank 0 prints
    the loss and test accuracy after each epoch. Returns the last test accuracy."""
    rank, world, model, optimizer, mean = trainer
    x, y, x_test, y_test = dataset(seed)
    share = batch // world
    accuracy = 0.0
    for epoch in range(1, epochs + 1):
        losses = []
        for start in range(0, len(x) - batch + 1, batch):
            mine = slice(start + rank * share, start + (rank + 1) * share)
            loss = torch.nn.functional.cross_entropy(model(x[mine]), y[mine])
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.detach())
        mean_loss = mean(torch.stack(losses).mean().reshape(1))
        with torch.no_grad():
            accuracy = (model(x_test).argmax(1) == y_test).float().mean().item()
        if rank == 0:
            print(f"epoch {epoch}: loss {mean_loss.item():.4f}, test accuracy "
                  f"{accuracy:.2%} ({world} peer{'s' * (world > 1)})", flush=True)
    return accuracy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--batch", type=int, default=60, help="global batch (default 60)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backend", choices=["ringlib", "gloo"],
                        help="train with DDP on this torch.distributed backend (torchrun)")
    args = parser.parse_args()

    trainer = ddp_trainer(args.seed, args.backend) if args.backend else ringlib_trainer(args.seed)
    with trainer as parts:
        fit(parts, args.epochs, args.batch, args.seed)


if __name__ == "__main__":
    main()
