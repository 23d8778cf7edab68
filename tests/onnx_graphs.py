"""Building small ONNX graphs from ONNX text, and running them in onnxruntime with graph optimisations off.

A graph is written in ONNX text with every parameter as a graph input; :func:`build` turns the named ones into
initializers filled with seeded random values, so a test reads as its topology. Names starting with ``v`` are
variances (positive); everything else is drawn around zero (BN scales: names starting with ``s``, near 1).
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import onnx.parser
import onnxruntime as ort
from onnx import TensorProto, numpy_helper

NP_TYPES = {
    TensorProto.FLOAT: np.float32,
    TensorProto.FLOAT16: np.float16,
    TensorProto.BFLOAT16: ml_dtypes.bfloat16,
    TensorProto.DOUBLE: np.float64,
}
#: What a symbolic dimension (the batch) is set to when drawing inputs.
BATCH = 3


def _shape(info: onnx.ValueInfoProto) -> tuple[int, ...]:
    return tuple(d.dim_value if d.HasField("dim_value") else BATCH for d in info.type.tensor_type.shape.dim)


def draw(name: str, shape: tuple[int, ...], rng: np.random.Generator, small_var: bool = False) -> np.ndarray:
    """A parameter value by naming convention (see the module docstring), in float32."""
    if name.startswith("v"):
        low, high = (-5.0, 0.5) if small_var else (-0.3, 0.3)
        return (10.0 ** rng.uniform(low, high, size=shape)).astype(np.float32)
    if name.startswith("s"):
        return rng.uniform(0.5, 1.5, size=shape).astype(np.float32) * rng.choice([-1, 1], size=shape)
    return (rng.normal(size=shape) * 0.5).astype(np.float32)


def build(text: str, constants: tuple[str, ...] | None = None, *, seed: int = 0, listed: tuple[str, ...] = (),
          small_var: bool = False) -> onnx.ModelProto:
    """Parse ``text`` and make the graph inputs named in ``constants`` (default: every input but the first)
    initializers with seeded values; those in ``listed`` stay graph inputs too (initializer + input, IR < 4 style)."""
    model = onnx.parser.parse_model(text)
    rng = np.random.default_rng(seed)
    inputs = list(model.graph.input)
    names = constants if constants is not None else tuple(i.name for i in inputs[1:])
    kept = []
    for info in inputs:
        if info.name not in names:
            kept.append(info)
            continue
        elem = info.type.tensor_type.elem_type
        value = draw(info.name, _shape(info), rng, small_var).astype(NP_TYPES[elem])
        model.graph.initializer.append(numpy_helper.from_array(value, info.name))
        if info.name in listed:
            kept.append(info)
    del model.graph.input[:]
    model.graph.input.extend(kept)
    return model


def feeds(model: onnx.ModelProto, seed: int = 1) -> dict[str, np.ndarray]:
    """Seeded standard-normal values for every graph input that is not an initializer."""
    rng = np.random.default_rng(seed)
    initializers = {t.name for t in model.graph.initializer}
    return {i.name: rng.normal(size=_shape(i)).astype(NP_TYPES[i.type.tensor_type.elem_type])
            for i in model.graph.input if i.name not in initializers}


def run(model: onnx.ModelProto | str, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Outputs from onnxruntime with every graph optimisation off (no fusion of its own hides a wrong fold)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    source = model if isinstance(model, str) else model.SerializeToString()
    session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    return session.run(None, inputs)


def as_float32(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy with every bfloat16 tensor and value made float32 (exact), to run where onnxruntime has no bf16."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    graph = copy.graph
    for tensor in graph.initializer:
        if tensor.data_type == TensorProto.BFLOAT16:
            tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor).astype(np.float32), tensor.name))
    for info in [*graph.input, *graph.output, *graph.value_info]:
        if info.type.tensor_type.elem_type == TensorProto.BFLOAT16:
            info.type.tensor_type.elem_type = TensorProto.FLOAT
    return copy


def op_count(model: onnx.ModelProto, op_type: str) -> int:
    return sum(1 for n in model.graph.node if n.op_type == op_type)
