"""Data-parallel training of a small classifier on scikit-learn's bundled digits.

    ringlib launch -n 2 -- python examples/train_digits.py     # 2 peers, a shard each
    python examples/train_digits.py                            # one process: the same run

Every step takes the same global batch of 64 images; each rank trains on its share, and
ringlib.torch averages the gradients, so the peers follow the single process's path and
reach its accuracy. Rank 0 prints the loss and the test accuracy after each epoch.
"""

from __future__ import annotations

import argparse

import torch
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--batch", type=int, default=60, help="global batch (default 60)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    with ringlib.init() as ring:
        torch.manual_seed(args.seed + ring.rank)  # ranks start apart; the broadcast aligns them
        model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(),
                                    torch.nn.Linear(128, 10))
        rt.broadcast_parameters(model, ring, root=0)
        averager = rt.GradientAverager(model, ring)
        optimizer = rt.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1,
                                                            momentum=0.9), averager)
        x, y, x_test, y_test = dataset(args.seed)
        share = args.batch // ring.world_size
        for epoch in range(1, args.epochs + 1):
            losses = []
            for start in range(0, len(x) - args.batch + 1, args.batch):
                mine = slice(start + ring.rank * share, start + (ring.rank + 1) * share)
                loss = torch.nn.functional.cross_entropy(model(x[mine]), y[mine])
                loss.backward()
                optimizer.step()
                optimizer.zero_grad()
                losses.append(loss.detach())
            mean_loss = ring.all_reduce(torch.stack(losses).mean().reshape(1), "mean")
            with torch.no_grad():
                accuracy = (model(x_test).argmax(1) == y_test).float().mean().item()
            if ring.rank == 0:
                print(f"epoch {epoch}: loss {mean_loss.item():.4f}, test accuracy "
                      f"{accuracy:.2%} ({ring.world_size} peer{'s' * (ring.world_size > 1)})",
                      flush=True)


if __name__ == "__main__":
    main()
