"""Models that are no nn.Sequential, cut by split_traced (torch.fx) and split_onnx: the
stages chained, in one process and as a pipeline of real processes, give the whole
model's outputs, checked against the model run in float64."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

import ringlib
from ring_harness import ringlib_env, run_ranks
from ringlib.pipeline import OnnxStage, TorchStage, export_onnx, split_onnx, split_traced
from ringlib.runtime.cuts import crossing_values, open_cuts
from ringlib.transport.addresses import local_addresses
from traced_models import Branching, Reshaping, branchy, inputs

pytestmark = pytest.mark.timeout(60)
PEER = Path(__file__).with_name("traced_peer.py")
TOLERANCE = {"rtol": 1e-4, "atol": 1e-4}  # float32 stages against the float64 model


def chain(stages: list, act):
    """Each stage on what the one before returned, as a pipeline passes it on."""
    for stage in stages:
        act = stage(act)
    return act


def assert_like_the_model(model: torch.nn.Module, act, out, seed: int) -> None:
    """`out` equals `model` (in float64) on the activation `act` (a dict of inputs)."""
    with torch.inference_mode():
        expected = copy.deepcopy(model).double()(**{k: t.double() for k, t in act.items()})
    for name, tensor in expected.items():
        torch.testing.assert_close(out[name].double(), tensor, **TOLERANCE,
                                   msg=lambda m: f"{name}, seed {seed}: {m}")


def placeholders(stage: torch.fx.GraphModule) -> list[str]:
    return [node.name for node in stage.graph.nodes if node.op == "placeholder"]


@pytest.mark.parametrize("at", [
    ["blocks.1"],                              # a residual block; the skip and `offset` cross
    ["blocks.0", "blocks.2.fc2", "right.1"],   # inside a block, inside a merging branch
    ["shared_1"],                              # an fx node: the second call of `shared`
    ["shared", "head"],                        # the module called twice, at its first call
])
def test_stages_cut_at_named_points_give_the_models_outputs(at, seed):
    model, generator = branchy(seed), torch.Generator().manual_seed(seed)
    stages = split_traced(model, inputs(generator, 2), at=at)
    assert len(stages) == len(at) + 1
    act = inputs(generator, 9)
    assert_like_the_model(model, act, chain([TorchStage(s) for s in stages], act), seed)


@pytest.mark.parametrize("balance", ["params", "time"])
@pytest.mark.parametrize("parts", [1, 2, 3, 5])
def test_stages_cut_by_cost_give_the_models_outputs(parts, balance, seed):
    model, generator = branchy(seed), torch.Generator().manual_seed(seed)
    stages = split_traced(model, inputs(generator, 4), parts=parts, balance=balance)
    assert len(stages) == parts
    act = inputs(generator, 6)
    assert_like_the_model(model, act, chain([TorchStage(s) for s in stages], act), seed)


def test_a_skip_connection_goes_through_the_stages_between_as_a_tuple_in_order_made(seed):
    model, generator = branchy(seed), torch.Generator().manual_seed(seed)
    first, middle, last = split_traced(model, inputs(generator, 2), at=["blocks.0", "right.1"])
    assert placeholders(first) == ["x", "offset"]
    # `offset` (a model input) and `stem` (the skip) are used only in the last stage.
    assert placeholders(middle) == ["offset", "stem"]
    assert placeholders(last) == ["offset", "stem", "tanh", "right_0"]
    crossing = TorchStage(middle)(TorchStage(first)(inputs(generator, 3)))
    assert isinstance(crossing, tuple) and len(crossing) == 4
    assert all(isinstance(t, torch.Tensor) and t.shape[0] == 3 for t in crossing)


def test_the_stages_share_the_models_parameters_and_copy_none(seed):
    model = branchy(seed)
    stages = split_traced(model, inputs(torch.Generator().manual_seed(seed), 2), parts=4)
    shared = {id(p) for stage in stages for p in stage.parameters()}
    assert shared == {id(p) for p in model.parameters()}
    assert stages[0].get_submodule("stem") is model.stem


def test_by_cost_the_cut_never_passes_a_value_that_is_no_tensor(seed):
    torch.manual_seed(seed)
    model, x = Reshaping(), torch.randn(5, 12)
    stages = split_traced(model, x, parts=3)  # rows (an int) lives from size to reshape
    act = x
    for stage in stages[:-1]:
        act = TorchStage(stage)(act)
        assert all(isinstance(t, torch.Tensor) for t in (act if isinstance(act, tuple) else [act]))
    with torch.inference_mode():
        expected = copy.deepcopy(model).double()(x.double())
    torch.testing.assert_close(TorchStage(stages[-1])(act).double(), expected, **TOLERANCE)


def test_traced_stages_run_as_a_pipeline_of_three_processes(seed):
    peers = local_addresses(3, "tcp", "")
    envs = [ringlib_env(r, 3, peers) for r in range(3)]
    finished = run_ranks([str(PEER), str(seed)], envs, timeout=50)
    report = "\n".join(f"--- rank {f.rank} exit {f.returncode}\n{f.stdout}{f.stderr[-3000:]}"
                       for f in finished)
    assert all(f.returncode == 0 for f in finished), f"seed {seed}\n{report}"
    assert "outputs equal" in finished[0].stdout, report


@pytest.mark.parametrize("at, message", [
    (["blocks.9"], r"unknown split point 'blocks.9'; valid names include 'stem', 'blocks.0'"),
    (["right.1", "blocks.1"], r"'blocks.1' runs before 'right.1'"),
    (["blocks.1", "blocks.1.norm"], r"'blocks.1' and 'blocks.1.norm' start at the same node"),
    (["stem"], r"'stem' is the first node, so the first stage would be empty"),
])
def test_bad_split_points_are_named(at, message):
    with pytest.raises(ringlib.InvalidArgument, match=message):
        split_traced(branchy(0), inputs(torch.Generator(), 2), at=at)


def test_a_value_that_is_no_tensor_may_not_cross_a_named_cut():
    with pytest.raises(ringlib.InvalidArgument, match=r"'reshape': 'size' \(int\) is made "
                                                      r"before it and used after it"):
        split_traced(Reshaping(), torch.randn(2, 12), at=["reshape"])
    with pytest.raises(ringlib.InvalidArgument, match="leaves 3 places to cut"):
        split_traced(Reshaping(), torch.randn(2, 12), parts=4)


def test_what_fx_cannot_trace_and_arguments_out_of_range_are_invalid():
    with pytest.raises(ringlib.InvalidArgument, match="torch.fx cannot trace Branching"):
        split_traced(Branching(), torch.randn(2, 12), at=["fc"])
    for kwargs in ({}, {"at": ["fc1"], "parts": 2}):
        with pytest.raises(ringlib.InvalidArgument, match="either `at`"):
            split_traced(Reshaping(), torch.randn(2, 12), **kwargs)
    with pytest.raises(ringlib.InvalidArgument, match="balance must be one of"):
        split_traced(Reshaping(), torch.randn(2, 12), parts=2, balance="flops")


def onnx_model(model: torch.nn.Module, act, path: Path) -> list[str]:
    """Export `model` to `path`; return its node names."""
    export_onnx(model, act, path)
    return [node.name for node in onnx.load(path).graph.node]


def first_named(names: list[str], prefix: str) -> str:
    return next(name for name in names if name.startswith(prefix))


@pytest.mark.parametrize("prefixes", [["/blocks.1/"], ["/blocks.1/", "/right/right.1", "/head"]])
def test_onnx_stages_cut_at_node_names_chain_to_the_whole_models_outputs(prefixes, tmp_path,
                                                                         seed):
    model, generator = branchy(seed), torch.Generator().manual_seed(seed)
    names = onnx_model(model, inputs(generator, 2), tmp_path / "whole.onnx")
    at = [first_named(names, prefix) for prefix in prefixes]
    paths = split_onnx(tmp_path / "whole.onnx", at, tmp_path / "stages")
    assert paths == [tmp_path / "stages" / f"stage{k}.onnx" for k in range(len(at) + 1)]
    stages = [OnnxStage(path) for path in paths]
    assert stages[0].input_names == ["x", "offset"]
    act = inputs(generator, 7)
    out = chain(stages, act)
    whole = OnnxStage(tmp_path / "whole.onnx")(act)
    for got, expected in zip(out, whole, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    assert_like_the_model(model, act, dict(zip(["logits", "features"], out)), seed)


def test_onnx_split_takes_a_loaded_model_and_names_bad_points(tmp_path):
    names = onnx_model(branchy(0), inputs(torch.Generator(), 2), tmp_path / "whole.onnx")
    proto = onnx.load(tmp_path / "whole.onnx")
    assert len(split_onnx(proto, [first_named(names, "/head")], tmp_path)) == 2
    with pytest.raises(ringlib.InvalidArgument, match="unknown split point 'nope'; valid names"):
        split_onnx(proto, ["nope"], tmp_path)
    with pytest.raises(ringlib.InvalidArgument, match="runs before"):
        split_onnx(proto, [first_named(names, "/head"), first_named(names, "/stem")], tmp_path)


def control_flow_model() -> onnx.ModelProto:
    """y = -(c + 3a), a = relu(x), b = 2a, c = (a + b) w if sum(x) > 0 else a - b: an If
    whose branches read a and b (and the weight w, used nowhere else) from the graph
    around them, and a Loop whose body adds a to its carried value three times."""
    from onnx import TensorProto, helper
    tensor = helper.make_tensor_value_info

    def branch(name: str, nodes: list) -> onnx.GraphProto:
        return helper.make_graph(nodes, name, [], [tensor(nodes[-1].output[0],
                                                          TensorProto.FLOAT, ["n", 4])])
    then = branch("then", [helper.make_node("Add", ["a", "b"], ["t"]),
                           helper.make_node("Mul", ["t", "w"], ["tw"])])
    other = branch("else", [helper.make_node("Sub", ["a", "b"], ["e"])])
    body = helper.make_graph(
        [helper.make_node("Identity", ["going"], ["going_on"]),
         helper.make_node("Add", ["carried", "a"], ["carried_on"])], "body",
        [tensor("i", TensorProto.INT64, []), tensor("going", TensorProto.BOOL, []),
         tensor("carried", TensorProto.FLOAT, None)],
        [tensor("going_on", TensorProto.BOOL, []),
         tensor("carried_on", TensorProto.FLOAT, ["n", 4])])
    nodes = [helper.make_node("Relu", ["x"], ["a"], name="relu"),
             helper.make_node("Mul", ["a", "two"], ["b"], name="double"),
             helper.make_node("ReduceSum", ["x"], ["s"], name="sum", keepdims=0),
             helper.make_node("Greater", ["s", "zero"], ["positive"], name="test"),
             helper.make_node("If", ["positive"], ["c"], name="if", then_branch=then,
                              else_branch=other),
             helper.make_node("Loop", ["three", "", "c"], ["d"], name="loop", body=body),
             helper.make_node("Neg", ["d"], ["y"], name="negate")]
    weights = [helper.make_tensor("two", TensorProto.FLOAT, [], [2.0]),
               helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0]),
               helper.make_tensor("three", TensorProto.INT64, [], [3]),
               helper.make_tensor("w", TensorProto.FLOAT, [4], [0.5, -1.0, 2.0, 3.0])]
    graph = helper.make_graph(nodes, "control", [tensor("x", TensorProto.FLOAT, ["n", 4])],
                              [tensor("y", TensorProto.FLOAT, ["n", 4])], weights)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


@pytest.mark.parametrize("at", [["double"], ["sum"], ["test"], ["if"], ["loop"],
                                ["double", "test", "loop"]])
@pytest.mark.parametrize("sign", [1, -1])
def test_onnx_cuts_carry_what_if_and_loop_bodies_read_from_around_them(at, sign, rng, seed,
                                                                        tmp_path):
    """Without them in the cuts and the extraction, the stages would lack a and b (or the
    nodes making them, or w): the checker refuses such a stage."""
    x = sign * np.abs(rng.standard_normal((5, 4)))
    a = np.maximum(x, 0)
    w = np.array([0.5, -1.0, 2.0, 3.0])
    c = (a + 2 * a) * w if x.sum() > 0 else a - 2 * a
    expected = -(c + 3 * a)
    paths = split_onnx(control_flow_model(), at, tmp_path)
    out = chain([OnnxStage(path) for path in paths], torch.from_numpy(x.astype(np.float32)))
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-5, atol=1e-5,
                               err_msg=f"cut at {at}, seed {seed}")


def test_an_onnx_cut_that_a_value_of_unknown_rank_would_cross_is_refused(tmp_path):
    """Shape inference gives the Loop's output no shape; a stage taking it would fail the
    checker (and onnxruntime could not say what it takes)."""
    with pytest.raises(ringlib.InvalidArgument, match=r"cannot cut at 'negate': .* \['d'\]"):
        split_onnx(control_flow_model(), ["if", "negate"], tmp_path)
    assert not list(tmp_path.iterdir())  # refused before any stage was written


def test_crossing_values_carry_a_skip_and_open_cuts_avoid_a_blocking_value():
    # x is an input; a, b, c are made by nodes 0, 1, 2; the output (3) uses a and c.
    made = {"x": -1, "a": 0, "b": 1, "c": 2}
    used = {"x": [0], "a": [1, 3], "b": [2], "c": [3]}
    assert crossing_values(made, used, [1, 2]) == [["a"], ["a", "b"]]
    assert open_cuts(made, used, 3, ["b"]) == [1]
    assert open_cuts(made, used, 3, []) == [1, 2]
