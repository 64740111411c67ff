"""Cut any torch model that torch.fx can trace into pipeline stages, at named points or
by cost, as torch.distributed.pipelining's pipeline() and Accelerate's prepare_pippy do.

The model is traced once (torch.fx.symbolic_trace) into a graph whose nodes run in one
order; a stage is a run of consecutive nodes (cuts.py says what crosses each cut). Every
stage is a GraphModule over the model's own submodules and parameters, and takes what
the stage before it returns: the first stage the model's own arguments, the last
returns the model's output. Between stages, one value passes as a tensor and several as
a tuple in the order the model makes them; values that a later stage needs (a skip
connection) go through the stages in between. The example run tells which values are
tensors: only those may cross a cut.
"""

from __future__ import annotations

import inspect
import operator
from typing import Any

import torch
import torch.fx

from ringlib.errors import InvalidArgument

from .activations import Activation
from .cuts import crossing_values, cut_indices, open_cuts
from .splitting import BALANCES, cut_points, fastest_seconds

Node = torch.fx.Node
ENDS = ("placeholder", "output")  # the nodes that are no stage's work


def split_traced(model: torch.nn.Module, example: Activation, at: list[str] | None = None,
                 parts: int | None = None, balance: str = "params") -> list[torch.nn.Module]:
    """Cut `model` into stages that chain as stage_k(stage_k-1(...)) to the model's output.

    example: an input batch, passed as TorchStage passes it (a tuple as positional
    arguments, a dict as keyword arguments); it runs once, to see which values are tensors.
    at: where stages start: names of submodules (as model.named_modules() gives them; a
    stage starts at the module's first call) or of the traced graph's nodes, in order.
    parts: instead of `at`, how many stages, cut where the largest stage's cost is least:
    balance "params" (parameter counts) or "time" (each node's forward time on `example`).
    """
    if (at is None) == (parts is None):
        raise InvalidArgument("split_traced takes either `at` (named split points) or "
                              "`parts` (a number of stages)")
    if balance not in BALANCES:
        raise InvalidArgument(f"balance must be one of {BALANCES}, got {balance!r}")
    traced = _trace(model)
    nodes = [node for node in traced.graph.nodes if node.op not in ENDS]
    profile = _Profile(traced, timed=parts is not None and balance == "time")
    with torch.inference_mode():
        profile.run(*_arguments(model, example))
    made, used = _positions(traced, nodes)
    if at is not None:
        cuts = cut_indices(at, _starts(nodes))
        _check_tensors(at, crossing_values(made, used, cuts), profile)
    else:
        costs = [profile.seconds[n] if balance == "time" else _parameters(traced, n)
                 for n in nodes]
        blocking = [node for node in made if not profile.is_tensor(node)]
        cuts = _balanced_cuts(costs, open_cuts(made, used, len(nodes), blocking), parts)
    bounds = [0, *cuts, len(nodes)]
    crossing = crossing_values(made, used, cuts)
    return [_stage(traced, k, nodes[a:b], crossing[k - 1] if k else None,
                   crossing[k] if k < len(cuts) else None)
            for k, (a, b) in enumerate(zip(bounds, bounds[1:]))]


def _trace(model: torch.nn.Module) -> torch.fx.GraphModule:
    """The model's graph, or InvalidArgument saying why torch.fx cannot trace it."""
    if not isinstance(model, torch.nn.Module):
        raise InvalidArgument(f"split_traced needs a torch.nn.Module, got {type(model).__name__}")
    try:
        return torch.fx.symbolic_trace(model)
    except Exception as exc:
        raise InvalidArgument(
            f"torch.fx cannot trace {type(model).__name__}: {type(exc).__name__}: {exc} "
            "(fx runs forward() on stand-in values: Python control flow on tensor values "
            "or sizes, and code that needs real values, such as numpy, do not trace)"
        ) from exc


def _arguments(model: torch.nn.Module, example: Activation) -> tuple:
    """The example as positional arguments of the traced graph's inputs."""
    if isinstance(example, tuple):
        return example
    if isinstance(example, dict):
        bound = inspect.signature(model.forward).bind(**example)
        bound.apply_defaults()
        return bound.args
    return (example,)


class _Profile(torch.fx.Interpreter):
    """Runs the traced graph once, noting the type of what each node returns and, when
    timed, each node's fastest forward time."""

    def __init__(self, traced: torch.fx.GraphModule, timed: bool) -> None:
        super().__init__(traced)
        self.timed = timed
        self.kinds: dict[Node, type] = {}
        self.seconds: dict[Node, float] = {}

    def run_node(self, n: Node) -> Any:
        result = super().run_node(n)  # also the warm-up of a timed node
        self.kinds[n] = type(result)
        if self.timed and n.op not in ENDS:
            cuda = isinstance(result, torch.Tensor) and result.is_cuda
            self.seconds[n] = fastest_seconds(lambda: torch.fx.Interpreter.run_node(self, n),
                                              cuda)
        return result

    def is_tensor(self, node: Node) -> bool:
        return issubclass(self.kinds[node], torch.Tensor)


def _positions(traced: torch.fx.GraphModule, nodes: list[Node]
               ) -> tuple[dict[Node, int], dict[Node, list[int]]]:
    """Where each value that may cross a cut is made (-1: an input of the model) and
    where it is used (len(nodes): by the model's output). An attribute read (get_attr)
    crosses no cut: each stage that uses it reads it from the model itself."""
    index = {node: i for i, node in enumerate(nodes)}
    made = {node: index.get(node, -1) for node in traced.graph.nodes
            if node.op not in ("get_attr", "output")}
    used = {node: [index.get(user, len(nodes)) for user in node.users] for node in made}
    return made, used


def _starts(nodes: list[Node]) -> dict[str, int]:
    """Each split point's name -> the index of its first node: submodules by the first
    node run inside their first call, then the nodes by their own names."""
    starts: dict[str, int] = {}
    for i, node in enumerate(nodes):
        for qualified_name, _ in node.meta.get("nn_module_stack", {}).values():
            starts.setdefault(qualified_name, i)
    for i, node in enumerate(nodes):
        starts.setdefault(node.name, i)
    return starts


def _check_tensors(points: list[str], crossing: list[list[Node]],
                   profile: _Profile) -> None:
    """Raise unless every value crossing each point's cut is a tensor."""
    for point, values in zip(points, crossing):
        for node in values:
            if not profile.is_tensor(node):
                raise InvalidArgument(
                    f"cannot cut at {point!r}: {node.name!r} ({profile.kinds[node].__name__}) "
                    "is made before it and used after it, and only tensors cross between "
                    "stages; cut before or after it")


def _parameters(traced: torch.fx.GraphModule, node: Node) -> float:
    """A node's cost by parameter count: its module's, or the tensor attribute it reads."""
    if node.op == "call_module":
        return float(sum(p.numel() for p in traced.get_submodule(node.target).parameters()))
    if node.op == "get_attr":
        value = operator.attrgetter(node.target)(traced)
        return float(value.numel()) if isinstance(value, torch.Tensor) else 0.0
    return 0.0


def _balanced_cuts(costs: list[float], allowed: list[int], parts: int) -> list[int]:
    """The `allowed` cuts that make `parts` stages of the least largest cost."""
    bounds = [0, *allowed, len(costs)]
    if not 1 <= parts < len(bounds):
        raise InvalidArgument(f"cannot cut the model into {parts} stages: only tensors cross "
                              f"between stages, which leaves {len(bounds) - 1} places to cut")
    runs = [sum(costs[a:b]) for a, b in zip(bounds, bounds[1:])]
    return [bounds[i] for i in cut_points(runs, parts)]


def _stage(traced: torch.fx.GraphModule, k: int, nodes: list[Node],
           inputs: list[Node] | None, outputs: list[Node] | None) -> torch.fx.GraphModule:
    """Stage k: `nodes` in a graph of their own, taking `inputs` (None: the model's
    inputs) and returning `outputs` (None: the model's output)."""
    graph = torch.fx.Graph()
    env: dict[Node, Node] = {}
    if inputs is None:
        env.update((node, graph.node_copy(node)) for node in traced.graph.nodes
                   if node.op == "placeholder")
    else:
        env.update((node, graph.placeholder(node.name)) for node in inputs)

    def value(node: Node) -> Node:
        if node not in env:  # an attribute: a reference to the model's, not a copy
            env[node] = graph.node_copy(node)
        return env[node]
    for node in nodes:
        if node.op != "get_attr":
            env[node] = graph.node_copy(node, value)
    if outputs is None:
        output = next(node for node in traced.graph.nodes if node.op == "output")
        graph.output(torch.fx.node.map_arg(output.args[0], value))
    else:
        graph.output(value(outputs[0]) if len(outputs) == 1 else tuple(map(value, outputs)))
    return torch.fx.GraphModule(traced, graph, class_name=f"Stage{k}")
