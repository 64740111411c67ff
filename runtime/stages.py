"""Pipeline stages: what one rank runs on each micro-batch, as a plain callable.

A stage takes an activation (a tensor, a tuple of tensors or a dict of named tensors) and
returns the next one. TorchStage runs a torch module; OnnxStage runs an ONNX model with
onnxruntime, on the GPU where one is visible and CUDA loads, on the CPU otherwise. An
OnnxStage copies no tensors on the way: its inputs are numpy views of the torch tensors
and its outputs torch tensors over onnxruntime's arrays. export_onnx turns a torch stage
into an ONNX file that takes micro-batches of any size.
"""

from __future__ import annotations

import ctypes
import functools
import inspect
import os
import warnings
from pathlib import Path
from typing import Any, Callable

import onnxruntime as ort
import torch

from ringlib.errors import InvalidArgument

from .activations import Activation


ONNX_OPSET = 17
CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
SESSION_LOG_SEVERITY = 3  # errors only: no per-node "assigned to CPU" warnings from the CUDA EP

# onnxruntime's type strings for the dtypes a stage can feed.
_TORCH_DTYPES = {
    "tensor(float)": torch.float32,
    "tensor(double)": torch.float64,
    "tensor(float16)": torch.float16,
    "tensor(int64)": torch.int64,
    "tensor(int32)": torch.int32,
    "tensor(int16)": torch.int16,
    "tensor(int8)": torch.int8,
    "tensor(uint8)": torch.uint8,
    "tensor(bool)": torch.bool,
}


class TorchStage:
    """A torch module as a pipeline stage, run under torch.inference_mode().

    The module runs in whatever mode it is in: call module.eval() first if it has dropout
    or batch norm.
    """

    def __init__(self, module: torch.nn.Module) -> None:
        if not isinstance(module, torch.nn.Module):
            raise InvalidArgument(
                f"TorchStage needs a torch.nn.Module, got {type(module).__name__}")
        self.module = module

    def __call__(self, inputs: Activation) -> Activation:
        """tensor -> module(tensor); tuple -> module(*tuple); dict -> module(**dict)."""
        with torch.inference_mode():
            if isinstance(inputs, tuple):
                return self.module(*inputs)
            if isinstance(inputs, dict):
                return self.module(**inputs)
            return self.module(inputs)

    def __repr__(self) -> str:
        return f"TorchStage({type(self.module).__name__})"


class OnnxStage:
    """An ONNX model (a path or serialized bytes) run by onnxruntime.

    providers: onnxruntime's execution providers in order of preference. By default CUDA
    (then CPU) when onnxruntime has the CUDA provider and the NVIDIA driver sees a GPU,
    and the CPU alone otherwise, so a machine without a GPU prints nothing.
    """

    def __init__(self, model: str | os.PathLike | bytes,
                 providers: list[str] | None = None) -> None:
        self.name = "<bytes>" if isinstance(model, bytes) else os.fspath(model)
        options = ort.SessionOptions()
        options.log_severity_level = SESSION_LOG_SEVERITY
        chosen = default_providers() if providers is None else providers
        self._session = ort.InferenceSession(model, options, providers=chosen)
        self._inputs = [(i.name, _TORCH_DTYPES.get(i.type)) for i in self._session.get_inputs()]

    @property
    def providers(self) -> list[str]:
        """The providers the session really uses (onnxruntime drops those that failed)."""
        return self._session.get_providers()

    @property
    def input_names(self) -> list[str]:
        return [name for name, _ in self._inputs]

    def __call__(self, inputs: Activation) -> Activation:
        """Run the model: one output comes back as a tensor, several as a tuple in output order."""
        outputs = self._session.run(None, self._feeds(inputs))
        tensors = tuple(torch.from_numpy(array) for array in outputs)
        return tensors[0] if len(tensors) == 1 else tensors

    def _feeds(self, inputs: Activation) -> dict[str, Any]:
        """The model's inputs by name: a tensor is the only input, a tuple goes in input order."""
        names = self.input_names
        if isinstance(inputs, torch.Tensor):
            inputs = (inputs,)
        if isinstance(inputs, tuple):
            if len(inputs) != len(names):
                raise InvalidArgument(
                    f"{self!r} takes {len(names)} inputs {names}, got {len(inputs)}")
            named = dict(zip(names, inputs))
        elif isinstance(inputs, dict):
            if set(inputs) != set(names):
                raise InvalidArgument(f"{self!r} takes inputs {names}, got {sorted(inputs)}")
            named = inputs
        else:
            raise InvalidArgument(
                f"{self!r} takes a tensor, a tuple or a dict, got {type(inputs).__name__}")
        return {name: self._array(name, dtype, named[name]) for name, dtype in self._inputs}

    def _array(self, name: str, dtype: torch.dtype | None, tensor: Any) -> Any:
        """A numpy view of one input tensor (a copy only when it is not contiguous)."""
        if not isinstance(tensor, torch.Tensor) or tensor.device.type != "cpu":
            raise InvalidArgument(
                f"{self!r}: input {name!r} must be a CPU tensor, got {tensor!r:.80}")
        if dtype is not None and tensor.dtype != dtype:
            raise InvalidArgument(f"{self!r}: input {name!r} must be {dtype}, got {tensor.dtype}")
        return tensor.detach().contiguous().numpy()

    def __repr__(self) -> str:
        return f"OnnxStage({self.name!r})"


def default_providers() -> list[str]:
    """CUDA then CPU where onnxruntime has CUDA and a GPU is visible; the CPU alone otherwise.

    onnxruntime-gpu lists CUDAExecutionProvider as available even on a machine without a
    GPU or CUDA libraries, and asking for it there logs an error and a warning on stderr
    from the process-wide logger (a session's log level does not reach it), so the GPU is
    looked for first.
    """
    if CUDA in ort.get_available_providers() and visible_gpu_count() > 0:
        return [CUDA, CPU]
    return [CPU]


@functools.cache
def visible_gpu_count() -> int:
    """NVIDIA GPUs this process may use, asked through NVML (0 without a driver).

    NVML, unlike cuInit, creates no CUDA context, so processes forked later can still use
    CUDA. CUDA_VISIBLE_DEVICES set to "" or "-1" hides every GPU.
    """
    if os.environ.get("CUDA_VISIBLE_DEVICES", "0").strip() in ("", "-1"):
        return 0
    try:
        nvml = ctypes.CDLL("libnvidia-ml.so.1")
    except OSError:
        return 0
    count = ctypes.c_uint(0)
    if nvml.nvmlInit_v2() != 0:
        return 0
    try:
        return count.value if nvml.nvmlDeviceGetCount_v2(ctypes.byref(count)) == 0 else 0
    finally:
        nvml.nvmlShutdown()


def as_stage(stage: Any) -> Callable[[Activation], Activation]:
    """What a pipeline runs: a module or an .onnx path or model bytes wrapped, a callable as is."""
    if isinstance(stage, torch.nn.Module):
        return TorchStage(stage)
    if isinstance(stage, bytes):
        return OnnxStage(stage)
    if isinstance(stage, (str, os.PathLike)):
        if str(os.fspath(stage)).lower().endswith(".onnx"):
            return OnnxStage(stage)
        raise InvalidArgument(f"a stage given by path must be an .onnx file, got {stage!r}")
    if callable(stage):
        return stage
    raise InvalidArgument(f"cannot make a pipeline stage of {type(stage).__name__} {stage!r:.80}")


def export_onnx(module: torch.nn.Module, example: Activation, path: str | os.PathLike,
                dynamic_batch: bool = True) -> Path:
    """Write `module` to the ONNX file `path`, traced on `example`, and return the path.

    With dynamic_batch the first dimension of every input and output is symbolic, so the
    model runs on micro-batches of any size. Inputs are named after forward()'s parameters
    (so an OnnxStage takes the same dict as the module); outputs are "output" or
    "output_0", "output_1", ... The module is exported in eval mode.

    This uses torch's TorchScript exporter (dynamo=False): it needs nothing beyond torch
    and onnx, while the torch.export-based default also needs the onnxscript package.
    """
    args, kwargs = _split_example(example)
    input_names = _input_names(module, args, kwargs)
    with torch.no_grad():
        count = _count_tensors(module(*args, **kwargs))
    output_names = ["output"] if count == 1 else [f"output_{i}" for i in range(count)]
    dynamic_axes = ({name: {0: "batch"} for name in input_names + output_names}
                    if dynamic_batch else None)
    with warnings.catch_warnings():
        # The TorchScript exporter is deprecated in favour of the onnxscript-based one,
        # and says so both on the call and from inside.
        warnings.filterwarnings("ignore", "You are using the legacy TorchScript",
                                DeprecationWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.onnx")
        torch.onnx.export(module, args, os.fspath(path), kwargs=kwargs or None, dynamo=False,
                          opset_version=ONNX_OPSET, input_names=input_names,
                          output_names=output_names, dynamic_axes=dynamic_axes)
    return Path(path)


def _split_example(example: Activation) -> tuple[tuple[torch.Tensor, ...], dict[str, torch.Tensor]]:
    """Positional and keyword arguments for forward(), the way TorchStage calls it."""
    if isinstance(example, tuple):
        return tuple(_traceable(t) for t in example), {}
    if isinstance(example, dict):
        return (), {name: _traceable(t) for name, t in example.items()}
    return (_traceable(example),), {}


def _traceable(tensor: torch.Tensor) -> torch.Tensor:
    """A tensor the tracer can use (not an inference tensor, as a previous stage's output is)."""
    return tensor.clone() if torch.is_inference(tensor) else tensor


def _input_names(module: torch.nn.Module, args: tuple, kwargs: dict) -> list[str]:
    """ONNX input names in graph order: forward()'s parameter names where it has them."""
    params = list(inspect.signature(module.forward).parameters.values())
    if kwargs:
        # The exporter binds keyword arguments to forward()'s signature, in its order.
        ordered = [p.name for p in params if p.name in kwargs]
        return ordered + [name for name in kwargs if name not in ordered]
    positional = [p.name for p in params
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(positional) >= len(args):
        return positional[:len(args)]
    return [f"input_{i}" for i in range(len(args))]


def _count_tensors(outputs: Any) -> int:
    """How many ONNX outputs a module's (possibly nested) result flattens to."""
    if isinstance(outputs, torch.Tensor):
        return 1
    if isinstance(outputs, dict):
        outputs = list(outputs.values())
    if isinstance(outputs, (tuple, list)):
        return sum(_count_tensors(item) for item in outputs)
    raise InvalidArgument(f"cannot export a module that returns {type(outputs).__name__}")
