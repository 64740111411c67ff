"""Cut an nn.Sequential into consecutive pipeline stages of balanced cost.

A pipeline runs as fast as its slowest stage, so the cut minimises the largest stage's
cost. cut_points does that over per-layer costs (a pure function, exact by dynamic
programming in O(parts * layers^2)); layer_costs measures the costs as parameter counts
or forward times, and split_sequential slices the model at the cuts.
"""

from __future__ import annotations

import functools
import itertools
import math
import time
from collections import OrderedDict
from typing import Callable, Sequence

import torch

from ringlib.errors import InvalidArgument

BALANCES = ("params", "time")
TIMED_RUNS = 3  # per layer (or graph node), after one warm-up run; the fastest one counts


def cut_points(costs: Sequence[float], parts: int) -> list[int]:
    """Where to cut layers of these costs into `parts` non-empty runs with the least largest sum.

    Returns parts - 1 increasing indices, each the first layer of the next run. Among equal
    optima each cut is as late as it can be while what follows is still cut optimally, so
    a layer of cost 0 (an activation) stays with the layer before it.
    """
    n = len(costs)
    if not 1 <= parts <= n:
        raise InvalidArgument(f"cannot cut {n} layers into {parts} non-empty parts")
    if any(not cost >= 0 for cost in costs):
        raise InvalidArgument(f"layer costs must be non-negative numbers, got {list(costs)}")
    prefix = [0.0, *itertools.accumulate(float(cost) for cost in costs)]

    def span(i: int, j: int) -> float:  # cost of layers i..j-1
        return prefix[j] - prefix[i]

    def split_at(k: int, i: int, j: int) -> float:
        # Largest part when layers i..j-1 form one part and layers j.. are cut into k-1.
        return max(span(i, j), best[k - 1][j])

    # best[k][i]: least possible largest part when layers i..n-1 are cut into k parts.
    # The first of those parts ends at j in i+1..n-k+1, leaving at least one layer per part.
    best = [[math.inf] * (n + 1) for _ in range(parts + 1)]
    best[1][:n] = [span(i, n) for i in range(n)]
    for k in range(2, parts + 1):
        for i in range(n - k + 1):
            best[k][i] = min(split_at(k, i, j) for j in range(i + 1, n - k + 2))
    # Walk the table forward: the exact same expressions, so the float comparison is exact.
    cuts, i = [], 0
    for k in range(parts, 1, -1):
        i = max(j for j in range(i + 1, n - k + 2) if split_at(k, i, j) == best[k][i])
        cuts.append(i)
    return cuts


def layer_costs(model: torch.nn.Sequential, balance: str = "params",
                example: torch.Tensor | None = None) -> list[float]:
    """Each layer's cost: its parameter count ("params") or forward time on `example` ("time")."""
    if balance == "params":
        return [float(sum(p.numel() for p in layer.parameters())) for layer in model]
    if balance == "time":
        if example is None:
            raise InvalidArgument('balance="time" needs an example input batch')
        return _forward_times(model, example)
    raise InvalidArgument(f"balance must be one of {BALANCES}, got {balance!r}")


def _forward_times(model: torch.nn.Sequential, example: torch.Tensor) -> list[float]:
    """Seconds each layer takes on the activation the layers before it produce."""
    times, x = [], example
    with torch.inference_mode():
        for layer in model:
            y = layer(x)  # warm-up: first calls allocate memory and pick kernels
            times.append(fastest_seconds(functools.partial(layer, x), example.is_cuda))
            x = y
    return times


def fastest_seconds(run: Callable[[], object], cuda: bool = False) -> float:
    """The fastest of TIMED_RUNS calls of `run` (already warmed up), waiting for CUDA's
    queued work around each call when `cuda`."""
    synchronize = torch.cuda.synchronize if cuda else (lambda: None)
    fastest = math.inf
    for _ in range(TIMED_RUNS):
        synchronize()
        start = time.perf_counter()
        run()
        synchronize()
        fastest = min(fastest, time.perf_counter() - start)
    return fastest


def split_sequential(model: torch.nn.Sequential, parts: int, balance: str = "params",
                     example: torch.Tensor | None = None) -> list[torch.nn.Sequential]:
    """Cut `model` into `parts` consecutive nn.Sequential pieces of balanced cost.

    The pieces hold the model's own layer objects (no copies) under their original names.
    balance: "params" (parameter count) or "time" (forward time measured on `example`,
    an input batch, under inference_mode).
    """
    if not isinstance(model, torch.nn.Sequential):
        raise InvalidArgument(
            f"split_sequential needs a torch.nn.Sequential, got {type(model).__name__}")
    if not 1 <= parts <= len(model):
        raise InvalidArgument(f"cannot cut {len(model)} layers into {parts} non-empty parts")
    bounds = [0, *cut_points(layer_costs(model, balance, example), parts), len(model)]
    # Not model[a:b]: that calls type(model)(...), which a subclass may not accept.
    layers = list(model._modules.items())
    return [torch.nn.Sequential(OrderedDict(layers[a:b])) for a, b in zip(bounds, bounds[1:])]
