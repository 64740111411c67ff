"""Pipeline stages and model splitting: real torch and onnxruntime, no sockets."""

from __future__ import annotations

import itertools
from pathlib import Path

import onnx
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from onnxruntime.capi.onnxruntime_pybind11_state import InvalidArgument as OrtInvalidArgument

from ringlib.errors import InvalidArgument
from ringlib.runtime.splitting import cut_points, layer_costs, split_sequential
from ringlib.runtime.stages import (OnnxStage, TorchStage, as_stage, export_onnx,
                                    visible_gpu_count)

TOLERANCE = dict(rtol=1e-5, atol=1e-5)


class TwoInTwoOut(torch.nn.Module):
    """Several inputs and outputs of different shapes, to check their order."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(6, 5)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.tanh(self.linear(x)) * y[:, :1], y * 2 - 1


def mlp(widths: list[int]) -> torch.nn.Sequential:
    """Linear layers of these widths with a ReLU between each two."""
    layers: list[torch.nn.Module] = []
    for a, b in zip(widths, widths[1:]):
        layers += [torch.nn.Linear(a, b), torch.nn.ReLU()]
    return torch.nn.Sequential(*layers[:-1])


def randn(rng, *shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.from_numpy(rng.standard_normal(shape)).to(dtype)


@pytest.fixture
def model(seed) -> torch.nn.Sequential:
    torch.manual_seed(seed)
    return mlp([6, 16, 16, 3])


# --- TorchStage ------------------------------------------------------------------------

def test_torch_stage_feeds_a_tensor_a_tuple_and_a_dict(seed, rng):
    torch.manual_seed(seed)
    module = TwoInTwoOut()
    x, y = randn(rng, 4, 6), randn(rng, 4, 3)
    expected = module(x, y)
    stage = TorchStage(module)
    for got in (stage((x, y)), stage({"y": y, "x": x})):
        assert all(torch.equal(g, e) for g, e in zip(got, expected, strict=True))
        assert all(torch.is_inference(g) for g in got)
    linear = torch.nn.Linear(6, 2)
    assert torch.equal(TorchStage(linear)(x), linear(x))


def test_torch_stage_needs_a_module():
    with pytest.raises(InvalidArgument, match="torch.nn.Module"):
        TorchStage(lambda x: x)


# --- OnnxStage and export_onnx -----------------------------------------------------------

@pytest.mark.parametrize("source", ["path", "bytes"])
def test_onnx_stage_matches_torch_for_any_batch_size(model, rng, tmp_path, source):
    path = export_onnx(model, randn(rng, 2, 6), tmp_path / "mlp.onnx")
    assert isinstance(path, Path) and path.exists()
    proto = onnx.load(path)
    assert [o.version for o in proto.opset_import if o.domain == ""] == [17]
    for value in (proto.graph.input[0], proto.graph.output[0]):
        assert value.type.tensor_type.shape.dim[0].dim_param == "batch"
    stage = OnnxStage(path if source == "path" else path.read_bytes())
    assert stage.input_names == ["input"]  # nn.Sequential.forward(input)
    for batch in (1, 3, 8):
        x = randn(rng, batch, 6)
        got = stage(x)
        assert isinstance(got, torch.Tensor) and got.dtype == torch.float32
        torch.testing.assert_close(got, model(x).detach(), **TOLERANCE)


def test_onnx_stage_feeds_several_inputs_by_order_or_name(seed, rng, tmp_path):
    torch.manual_seed(seed)
    module = TwoInTwoOut()
    path = export_onnx(module, (randn(rng, 2, 6), randn(rng, 2, 3)), tmp_path / "two.onnx")
    stage = OnnxStage(path)
    assert stage.input_names == ["x", "y"]
    for batch in (1, 3, 8):
        x, y = randn(rng, batch, 6), randn(rng, batch, 3)
        expected = module(x, y)
        for got in (stage((x, y)), stage({"y": y, "x": x})):
            assert isinstance(got, tuple) and len(got) == 2
            for g, e in zip(got, expected):
                torch.testing.assert_close(g, e.detach(), **TOLERANCE)


def test_export_takes_an_example_made_under_inference_mode(model, rng, tmp_path):
    # The natural example for a stage is the previous stage's output: an inference tensor.
    first, second = split_sequential(model, 2)
    example = TorchStage(first)(randn(rng, 2, 6))
    assert torch.is_inference(example)
    stage = OnnxStage(export_onnx(second, example, tmp_path / "second.onnx"))
    x = randn(rng, 5, example.shape[1])
    torch.testing.assert_close(stage(x), second(x).detach(), **TOLERANCE)


def test_export_from_a_dict_example_names_inputs_in_forward_order(seed, rng, tmp_path):
    torch.manual_seed(seed)
    module = TwoInTwoOut()
    x, y = randn(rng, 3, 6), randn(rng, 3, 3)
    stage = OnnxStage(export_onnx(module, {"y": y, "x": x}, tmp_path / "kw.onnx"))
    assert stage.input_names == ["x", "y"]
    for got, expected in zip(stage({"x": x, "y": y}), module(x, y), strict=True):
        torch.testing.assert_close(got, expected.detach(), **TOLERANCE)


def test_onnx_stage_runs_float64_and_int64_models(seed, rng, tmp_path):
    torch.manual_seed(seed)
    doubles = torch.nn.Linear(6, 4).double()
    embed = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 2))
    ids = torch.from_numpy(rng.integers(0, 10, (5, 7)))
    cases = [(doubles, randn(rng, 5, 6, dtype=torch.float64), torch.float64),
             (embed, ids, torch.float32)]
    for i, (module, x, out_dtype) in enumerate(cases):
        stage = OnnxStage(export_onnx(module, x[:2], tmp_path / f"m{i}.onnx"))
        got = stage(x)
        assert got.dtype == out_dtype
        torch.testing.assert_close(got, module(x).detach(), **TOLERANCE)


def test_onnx_stage_takes_inputs_without_copying(model, rng, tmp_path):
    stage = OnnxStage(export_onnx(model, randn(rng, 2, 6), tmp_path / "mlp.onnx"))
    x = randn(rng, 4, 6)
    assert stage._feeds(x)["input"].ctypes.data == x.data_ptr()
    strided = randn(rng, 6, 4).t()  # not contiguous: the one case that copies
    torch.testing.assert_close(stage(strided), model(strided).detach(), **TOLERANCE)


def test_fixed_batch_export_keeps_the_example_shape(model, rng, tmp_path):
    path = export_onnx(model, randn(rng, 3, 6), tmp_path / "fixed.onnx", dynamic_batch=False)
    graph = onnx.load(path).graph
    for value in (graph.input[0], graph.output[0]):
        assert value.type.tensor_type.shape.dim[0].dim_value == 3
    with pytest.raises(OrtInvalidArgument, match="dimensions"):
        OnnxStage(path)(randn(rng, 4, 6))


@pytest.mark.skipif(visible_gpu_count() > 0,
                    reason="a GPU is visible: this checks the CPU fallback")
def test_onnx_stage_uses_the_cpu_quietly_without_a_gpu(model, rng, tmp_path, capfd):
    # onnxruntime-gpu lists CUDA as available here all the same.
    path = export_onnx(model, randn(rng, 2, 6), tmp_path / "mlp.onnx")
    capfd.readouterr()
    stage = OnnxStage(path)
    stage(randn(rng, 2, 6))
    assert capfd.readouterr() == ("", "")
    assert stage.providers == ["CPUExecutionProvider"]


def test_onnx_stage_takes_the_providers_it_is_given(model, rng, tmp_path):
    path = export_onnx(model, randn(rng, 2, 6), tmp_path / "mlp.onnx")
    stage = OnnxStage(path, providers=["CPUExecutionProvider"])
    assert stage.providers == ["CPUExecutionProvider"]


def test_onnx_stage_names_the_input_it_cannot_take(seed, rng, tmp_path):
    torch.manual_seed(seed)
    stage = OnnxStage(export_onnx(TwoInTwoOut(), (randn(rng, 2, 6), randn(rng, 2, 3)),
                                  tmp_path / "two.onnx"))
    x, y = randn(rng, 2, 6), randn(rng, 2, 3)
    with pytest.raises(InvalidArgument, match=r"two.onnx.*takes 2 inputs \['x', 'y'\], got 1"):
        stage(x)
    with pytest.raises(InvalidArgument, match=r"takes inputs \['x', 'y'\], got \['x', 'z'\]"):
        stage({"x": x, "z": y})
    with pytest.raises(InvalidArgument, match="input 'y' must be torch.float32, got torch.float64"):
        stage((x, y.double()))
    with pytest.raises(InvalidArgument, match="input 'x' must be a CPU tensor"):
        stage((x.numpy(), y))
    with pytest.raises(InvalidArgument, match="a tensor, a tuple or a dict, got list"):
        stage([x, y])


# --- as_stage ----------------------------------------------------------------------------

def test_as_stage_makes_stages_of_modules_onnx_files_bytes_and_callables(model, rng, tmp_path):
    path = export_onnx(model, randn(rng, 2, 6), tmp_path / "mlp.onnx")
    assert isinstance(as_stage(model), TorchStage) and as_stage(model).module is model
    for source in (path, str(path), path.read_bytes()):
        assert isinstance(as_stage(source), OnnxStage)
    torch_stage, function = TorchStage(model), (lambda x: x)
    assert as_stage(torch_stage) is torch_stage and as_stage(function) is function
    onnx_stage = OnnxStage(path)
    assert as_stage(onnx_stage) is onnx_stage


@pytest.mark.parametrize("bad, message", [
    (42, "cannot make a pipeline stage of int"),
    ("model.pt", "must be an .onnx file"),
    (Path("weights.bin"), "must be an .onnx file"),
])
def test_as_stage_refuses_what_it_cannot_run(bad, message):
    with pytest.raises(InvalidArgument, match=message):
        as_stage(bad)


# --- cut_points ----------------------------------------------------------------------------

@pytest.mark.parametrize("costs, parts, cuts", [
    ([5], 1, []),
    ([1, 1, 1, 1], 2, [2]),
    ([1, 2, 3, 4, 5], 2, [3]),          # 6 | 9
    ([1, 2, 3, 4, 5], 3, [3, 4]),       # 6 | 4 | 5
    ([9, 1, 1, 1], 2, [1]),             # the heavy layer alone
    ([1088, 0, 4160, 0, 1040], 2, [2]),  # the ReLU stays with the Linear before it
    ([1088, 0, 4160, 0, 1040], 3, [2, 4]),
    ([0, 0, 0], 3, [1, 2]),
    ([3, 0, 0], 2, [2]),
])
def test_cut_points_hand_cases(costs, parts, cuts):
    assert cut_points(costs, parts) == cuts


def largest_part(costs: list[int], cuts: list[int]) -> int:
    bounds = [0, *cuts, len(costs)]
    return max(sum(costs[a:b]) for a, b in zip(bounds, bounds[1:]))


@given(st.lists(st.integers(0, 50), min_size=1, max_size=9).flatmap(
    lambda costs: st.tuples(st.just(costs), st.integers(1, len(costs)))))
def test_cut_points_reach_the_brute_force_optimum(case):
    costs, parts = case
    cuts = cut_points(costs, parts)
    assert len(cuts) == parts - 1 and cuts == sorted(set(cuts))
    assert all(0 < c < len(costs) for c in cuts)
    optimum = min(largest_part(costs, list(every))
                  for every in itertools.combinations(range(1, len(costs)), parts - 1))
    assert largest_part(costs, cuts) == optimum


@pytest.mark.parametrize("costs, parts, message", [
    ([1, 2], 3, "cannot cut 2 layers into 3"),
    ([1, 2], 0, "cannot cut 2 layers into 0"),
    ([], 1, "cannot cut 0 layers into 1"),
    ([1, -1], 2, "non-negative"),
    ([1, float("nan")], 2, "non-negative"),
])
def test_cut_points_refuse_impossible_cuts(costs, parts, message):
    with pytest.raises(InvalidArgument, match=message):
        cut_points(costs, parts)


# --- split_sequential --------------------------------------------------------------------------

@pytest.mark.parametrize("parts", [1, 2, 3, 5])
def test_split_parts_compose_to_the_model_and_share_its_layers(model, rng, parts):
    pieces = split_sequential(model, parts)
    assert len(pieces) == parts and all(len(piece) > 0 for piece in pieces)
    assert [layer for piece in pieces for layer in piece] == list(model)  # the same objects
    assert [name for piece in pieces for name, _ in piece.named_children()] == \
        [name for name, _ in model.named_children()]
    x = randn(rng, 7, 6)
    with torch.inference_mode():
        y = x
        for piece in pieces:
            y = piece(y)
        assert torch.equal(y, model(x))


def test_split_by_params_balances_an_mlp():
    model = mlp([16, 64, 64, 16])  # Linear params 1088, 4160, 1040 with ReLUs between
    assert layer_costs(model) == [1088, 0, 4160, 0, 1040]
    pieces = split_sequential(model, 2)
    assert [len(piece) for piece in pieces] == [2, 3]
    pieces = split_sequential(model, 3)
    assert [list(piece) for piece in pieces] == [list(model[0:2]), list(model[2:4]), [model[4]]]


def test_split_by_time_puts_the_slow_layer_alone(rng):
    # Identity layers touch no data, so they stay far faster than the matmul even when
    # other processes load the machine.
    slow = torch.nn.Linear(512, 512)
    model = torch.nn.Sequential(torch.nn.Identity(), torch.nn.Identity(), slow,
                                torch.nn.Identity(), torch.nn.Identity())
    example = randn(rng, 256, 512)
    times = layer_costs(model, "time", example)
    assert len(times) == 5 and times[2] == max(times)
    pieces = split_sequential(model, 3, balance="time", example=example)
    assert list(pieces[1]) == [slow]


@pytest.mark.parametrize("kwargs, message", [
    (dict(parts=6), "cannot cut 5 layers into 6"),
    (dict(parts=0), "cannot cut 5 layers into 0"),
    (dict(parts=2, balance="time"), "needs an example"),
    (dict(parts=2, balance="flops"), "balance must be one of"),
])
def test_split_refuses_bad_arguments(model, kwargs, message):
    with pytest.raises(InvalidArgument, match=message):
        split_sequential(model, **kwargs)


def test_split_needs_a_sequential():
    with pytest.raises(InvalidArgument, match="torch.nn.Sequential"):
        split_sequential(torch.nn.Linear(2, 2), 1)
