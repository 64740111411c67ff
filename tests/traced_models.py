"""Models that are no nn.Sequential, for the traced splitter's tests and their peer:
a residual block, a skip connection across several blocks, a branch that merges, a
module called twice, an attribute read, and dicts in and out."""

from __future__ import annotations

import torch
from torch import nn

WIDTH = 16


class Residual(nn.Module):
    """x + fc2(relu(fc1(norm(x)))): the input is a skip connection around the block."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(WIDTH)
        self.fc1, self.fc2 = nn.Linear(WIDTH, 32), nn.Linear(32, WIDTH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(torch.relu(self.fc1(self.norm(x))))


class Branchy(nn.Module):
    """forward(x, offset) -> {"logits", "features"}; `offset` is used only at the end."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(12, WIDTH)
        self.blocks = nn.ModuleList(Residual() for _ in range(3))
        self.shared = nn.Linear(WIDTH, WIDTH)  # called twice
        self.left = nn.Linear(WIDTH, WIDTH)
        self.right = nn.Sequential(nn.Linear(WIDTH, 8), nn.Tanh(), nn.Linear(8, WIDTH))
        self.scale = nn.Parameter(torch.rand(WIDTH) + 0.5)
        self.head = nn.Linear(WIDTH, 5)

    def forward(self, x: torch.Tensor, offset: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.stem(x)
        skip = h
        for block in self.blocks:
            h = block(h)
        h = self.shared(h)
        left = torch.tanh(self.left(h))
        merged = left * torch.sigmoid(self.right(h))
        merged = self.shared(merged) * self.scale
        return {"logits": self.head(merged + skip), "features": merged + offset}


class Reshaping(nn.Module):
    """A value that is no tensor (x.size(0), an int) lives across one place to cut."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(12, 64), nn.Linear(64, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.size(0)
        return self.fc2(torch.relu(self.fc1(x).reshape(rows, 64)))


class Branching(nn.Module):
    """Python control flow on a tensor's value: torch.fx cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(12, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) if x.sum() > 0 else -self.fc(x)


def branchy(seed: int) -> Branchy:
    torch.manual_seed(seed)
    return Branchy().eval()


def inputs(generator: torch.Generator, rows: int) -> dict[str, torch.Tensor]:
    return {"x": torch.randn(rows, 12, generator=generator),
            "offset": torch.randn(rows, WIDTH, generator=generator)}
