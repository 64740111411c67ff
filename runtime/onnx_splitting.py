"""Cut an ONNX model into pipeline stages at named nodes, one .onnx file per stage.

Each stage is the run of the model's nodes from one split point to the next, extracted
with onnx.utils.Extractor. A stage's inputs are the values that cross the cut before it
(cuts.py) and its outputs those that cross the cut after it, in the same order and under
the same names, so OnnxStage(stage k)'s output tuple is OnnxStage(stage k+1)'s input
tuple. The first stage takes the model's inputs and the last returns its outputs.
Values made from constants alone (weights, Constant nodes) cross no cut: the extractor
copies the nodes that make them into every stage that uses them.
"""

from __future__ import annotations

import os
from pathlib import Path

import onnx
import onnx.shape_inference
import onnx.utils

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
    extractor = onnx.utils.Extractor(onnx.shape_inference.infer_shapes(proto))
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
        for name in node.input:
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
        inputs = [name for name in node.input if name]
        if node.op_type == "Constant" or (inputs and all(n in constants for n in inputs)):
            constants.update(node.output)
    return constants


def _check_typed(extractor: onnx.utils.Extractor, points: list[str],
                 crossing: list[list[str]]) -> None:
    """Raise unless shape inference typed every value that crosses a cut."""
    for point, names in zip(points, crossing):
        untyped = [name for name in names if name not in extractor.value_infos]
        if untyped:
            raise InvalidArgument(f"cannot cut at {point!r}: ONNX shape inference gives no "
                                  f"type for {untyped}, which would cross the cut")
