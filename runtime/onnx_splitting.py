"""Cut an ONNX model into pipeline stages at named nodes, one .onnx file per stage.

Each stage is the run of the model's nodes from one split point to the next, extracted
as onnx.utils.Extractor would (_Extractor says why not with it). A stage's inputs are
the values that cross the cut before it (cuts.py) and its outputs those that cross the
cut after it, in the same order and under the same names, so OnnxStage(stage k)'s
output tuple is OnnxStage(stage k+1)'s input tuple. The first stage takes the model's
inputs and the last returns its outputs.
Values made from constants alone (weights, Constant nodes) cross no cut: the extractor
copies the nodes that make them into every stage that uses them. What the bodies of If,
Loop and Scan nodes read from the graph around them counts as an input of their node,
in the cuts and in the extraction.
"""

from __future__ import annotations

import os
from pathlib import Path

import onnx
import onnx.helper
import onnx.shape_inference

from ringlib.errors import InvalidArgument

from .cuts import crossing_values, cut_indices


def split_onnx(model: str | os.PathLike | onnx.ModelProto, at: list[str],
               out_dir: str | os.PathLike) -> list[Path]:
    """Write stage0.onnx, stage1.onnx, ... to `out_dir` and return their paths.

    model: an ONNX file or a loaded model; at: the names of the nodes where stages start,
    in the model's node order.
    """
    proto = model if isinstance(model, onnx.ModelProto) else onnx.load(os.fspath(model))
    nodes = list(proto.graph.node)
    starts: dict[str, int] = {}
    for i, node in enumerate(nodes):
        if node.name:
            starts.setdefault(node.name, i)
    cuts = cut_indices(at, starts)
    crossing = crossing_values(*_positions(proto.graph), cuts)
    # Shape inference gives the values inside the graph the types that stage inputs need.
    extractor = _Extractor(onnx.shape_inference.infer_shapes(proto))
    _check_typed(extractor, at, crossing)
    initializers = {tensor.name for tensor in proto.graph.initializer}
    inputs = [[i.name for i in proto.graph.input if i.name not in initializers], *crossing]
    outputs = [*crossing, [o.name for o in proto.graph.output]]
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, (names_in, names_out) in enumerate(zip(inputs, outputs)):
        stage = extractor.extract_model(names_in, names_out)
        onnx.checker.check_model(stage)
        paths.append(folder / f"stage{k}.onnx")
        onnx.save(stage, paths[-1])
    return paths


def _positions(graph: onnx.GraphProto) -> tuple[dict[str, int], dict[str, list[int]]]:
    """Where each value that may cross a cut is made (-1: an input of the model) and
    where it is used (len(nodes): as an output of the model)."""
    nodes = graph.node
    constants = _constants(graph)
    made = {i.name: -1 for i in graph.input if i.name not in constants}
    made.update((name, i) for i, node in enumerate(nodes)
                for name in node.output if name and name not in constants)
    used: dict[str, list[int]] = {}
    for i, node in enumerate(nodes):
        for name in _inputs(node):
            used.setdefault(name, []).append(i)
    for output in graph.output:
        used.setdefault(output.name, []).append(len(nodes))
    return made, used


def _constants(graph: onnx.GraphProto) -> set[str]:
    """Values that depend on no input of the model: initializers, Constant nodes, and what
    nodes make from those alone (an Identity of a weight, say). They cross no cut: the
    extractor copies what makes them into every stage that uses them."""
    constants = {tensor.name for tensor in graph.initializer}
    for node in graph.node:
        inputs = _inputs(node)
        if node.op_type == "Constant" or (inputs and all(n in constants for n in inputs)):
            constants.update(node.output)
    return constants


def _inputs(node: onnx.NodeProto) -> list[str]:
    """A node's inputs, with the values its subgraphs (If, Loop, Scan bodies) read from
    the graph around them."""
    names = [name for name in node.input if name]
    for attribute in node.attribute:
        graphs = [attribute.g] if attribute.type == onnx.AttributeProto.GRAPH else attribute.graphs
        for graph in graphs:
            names += [name for name in _outer(graph) if name not in names]
    return names


def _outer(graph: onnx.GraphProto) -> list[str]:
    """The values a subgraph reads that it does not make or take itself."""
    made = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    outer: list[str] = []
    for node in graph.node:
        outer += [name for name in _inputs(node) if name not in made and name not in outer]
        made.update(node.output)
    return outer + [o.name for o in graph.output if o.name not in made and o.name not in outer]


class _Extractor:
    """Stages out of one model: the nodes that make a stage's outputs from its inputs,
    with the weights and types they use. onnx.utils.Extractor does the same by
    node.input alone, so it drops the nodes and weights that If, Loop and Scan bodies
    read from around them; and its helpers changed between onnx versions."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model, graph = model, model.graph
        if graph.sparse_initializer:
            raise InvalidArgument("split_onnx: sparse initializers are not supported")
        self.weights = {t.name: t for t in graph.initializer}
        self.typed = {v.name: v for v in [*graph.value_info, *graph.input, *graph.output]}
        self.maker = {name: i for i, node in enumerate(graph.node) for name in node.output
                      if name}

    def extract_model(self, names_in: list[str], names_out: list[str]) -> onnx.ModelProto:
        """The stage taking `names_in` and giving `names_out`, nodes in the model's order."""
        graph, given, reached = self.model.graph, set(names_in), set()
        wanted = list(names_out)
        while wanted:
            name = wanted.pop()
            if name not in given and name in self.maker and self.maker[name] not in reached:
                reached.add(self.maker[name])
                wanted += _inputs(graph.node[self.maker[name]])
        nodes = [graph.node[i] for i in sorted(reached)]
        used = {name for node in nodes for name in [*_inputs(node), *node.output]}
        stage = onnx.helper.make_graph(
            nodes, f"{graph.name} stage", [self.typed[n] for n in names_in],
            [self.typed[n] for n in names_out],
            initializer=[t for name, t in self.weights.items() if name in used],
            value_info=[v for name, v in self.typed.items() if name in used])
        return onnx.helper.make_model(stage, ir_version=self.model.ir_version,
                                      opset_imports=self.model.opset_import,
                                      functions=self.model.functions)


def _check_typed(extractor: _Extractor, points: list[str],
                 crossing: list[list[str]]) -> None:
    """Raise unless shape inference typed every value that crosses a cut, with a shape (of
    known rank: a stage's inputs and outputs need one, as the ONNX checker says)."""
    for point, names in zip(points, crossing):
        untyped = [name for name in names if not _shaped(extractor.typed.get(name))]
        if untyped:
            raise InvalidArgument(f"cannot cut at {point!r}: ONNX shape inference gives no "
                                  f"type and shape for {untyped}, which would cross the cut")


def _shaped(info: onnx.ValueInfoProto | None) -> bool:
    """Whether a value has a type, and a shape if it is a tensor."""
    kind = info.type.WhichOneof("value") if info is not None else None
    if kind is None:
        return False
    return kind != "tensor_type" or info.type.tensor_type.HasField("shape")
