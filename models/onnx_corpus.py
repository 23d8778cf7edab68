"""ONNX graphs as real producers spell BatchNorm, for bnfold's tests and benchmarks (issue 15, items 7 and 8).

Each builder in :data:`CORPUS` reproduces one producer's spelling of a BatchNorm, or of the affine a BN becomes,
in a small float32 graph with seeded, realistic weights (He-scaled convs, BN scales in [0.5, 1.5], variances in
[0.5, 2]); each call returns a fresh ``ModelProto`` that passes ``onnx.checker.check_model(full_check=True)`` and
runs in onnxruntime. The torch-exported entries come from a real ``nn.Module`` (:func:`convnet`).

The tests and the benchmark measure these graphs the same way, so that is decided here too:

* :func:`example_feeds`: seeded standard-normal values for every fed input, a dynamic dimension (``dim_param``,
  ``dim_value`` <= 0, or none) drawn at :data:`BATCH`;
* :func:`run_plain`: onnxruntime with every graph optimisation off (its own fusions would hide a wrong fold);
* :func:`parity`: the largest ``|got - reference|`` over every output element against the output scale
  ``max |reference|``; it passes when within ``RTOL * scale + ATOL``;
* :func:`left`: the BatchNormalization nodes, and the *affine chains*, left in a graph. An affine chain is what a
  BN becomes when an exporter writes it out (FrozenBatchNorm2d's ``Mul``/``Add``, tf2onnx's inference BN, the
  ``Sub``/``Div``/``Mul``/``Add`` of a hand-written BN): starting at a Conv, ConvTranspose, Gemm or MatMul output,
  follow the single consumer through ``Transpose`` nodes and through ``Mul``, ``Div``, ``Add`` and ``Sub`` whose
  other operand is a per-channel constant (a constant tensor with at most one dimension above 1; ``Div`` and
  ``Sub`` only with the layer's tensor first). The chain counts once if it holds a scale (``Mul``/``Div``) and a
  shift (``Add``/``Sub``): a lone ``Add`` is the layer's bias, a lone ``Mul`` a scale, neither a BN left behind.
  Constants are initializers (not listed as graph inputs, except in IR < 4, where onnxruntime reads listed ones as
  constants), ``Constant`` outputs, and outputs of nodes that read constants only (their shapes from onnx's shape
  inference; an unknown shape counts as per-channel).
"""

from __future__ import annotations

import functools
import io
import tempfile
import warnings
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import TensorProto, helper, numpy_helper, shape_inference
from torch import nn

from bnfold.onnx.export import captured_output
from models.zoo import randomize_bn_statistics

#: What a dynamic dimension is drawn at.
BATCH = 2
#: Parity passes when ``max |got - reference| <= RTOL * max |reference| + ATOL`` (float32 graphs).
RTOL, ATOL = 1e-4, 1e-5
NCHW, NHWC = [0, 3, 1, 2], [0, 2, 3, 1]
LAYERS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
SCALES, SHIFTS = ("Mul", "Div"), ("Add", "Sub")


# ----------------------------------------------------------------------------------------------- writing graphs


class _Graph:
    """A graph being written: seeded parameters, nodes named in order, weights as initializers or (``constant_nodes``)
    as ``Constant`` nodes."""

    def __init__(self, seed: int, *, constant_nodes: bool = False) -> None:
        self.rng = np.random.default_rng(seed)
        self.constant_nodes = constant_nodes
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []

    def _name(self, prefix: str) -> str:
        return f"{prefix}_{len(self.nodes) + len(self.initializers)}"

    def constant(self, prefix: str, **attr) -> str:
        """A ``Constant`` node with the one attribute given (``value``, ``value_float``, ``value_floats``...)."""
        name = self._name(prefix)
        self.nodes.append(helper.make_node("Constant", [], [name], name=f"{name}_node", **attr))
        return name

    def param(self, prefix: str, value: np.ndarray) -> str:
        """A float32 constant, as an initializer or a ``Constant`` node; its name."""
        value = np.asarray(value, dtype=np.float32)
        if self.constant_nodes:
            return self.constant(prefix, value=numpy_helper.from_array(value))
        name = self._name(prefix)
        self.initializers.append(numpy_helper.from_array(value, name))
        return name

    def op(self, op_type: str, *inputs: str, **attrs) -> str:
        """Append a one-output node; its output's name."""
        out = self._name(op_type.lower())
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], name=f"{out}_node", **attrs))
        return out

    def normal(self, shape: tuple[int, ...], std: float) -> np.ndarray:
        return self.rng.normal(scale=std, size=shape)

    def conv(self, x: str, cin: int, cout: int, k: int = 3, *, bias: bool = True) -> str:
        """A stride-1 'same' Conv with He-scaled weights."""
        weight = self.param("weight", self.normal((cout, cin, k, k), np.sqrt(2.0 / (cin * k * k))))
        inputs = [x, weight] + ([self.param("bias", self.normal((cout,), 0.1))] if bias else [])
        return self.op("Conv", *inputs, pads=[k // 2] * 4)

    def bn_stats(self, c: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(scale, B, mean, var) of an inference BN: scales near 1, var > 0."""
        return (self.rng.uniform(0.5, 1.5, c), self.normal((c,), 0.1), self.normal((c,), 0.2),
                self.rng.uniform(0.5, 2.0, c))

    def bn_affine(self, c: int, eps: float = 1e-5) -> tuple[np.ndarray, np.ndarray]:
        """The (multiplier, addend) an exporter writes for a BN it has already resolved to ``x * s + t``."""
        scale, shift, mean, var = self.bn_stats(c)
        s = scale / np.sqrt(var + eps)
        return s, shift - mean * s

    def batch_norm(self, x: str, c: int, **attrs) -> str:
        names = ("scale", "B", "mean", "var")
        return self.op("BatchNormalization", x, *(self.param(n, v) for n, v in zip(names, self.bn_stats(c))), **attrs)

    def model(self, inputs: list[onnx.ValueInfoProto], outputs: list[str], *, opset: int, ir_version: int,
              producer: tuple[str, str], listed: bool = False) -> onnx.ModelProto:
        """The model, its output shapes inferred; ``listed``: every initializer also a graph input (IR < 4 style)."""
        if listed:
            inputs = inputs + [helper.make_tensor_value_info(t.name, t.data_type, t.dims) for t in self.initializers]
        graph = helper.make_graph(self.nodes, f"{producer[0]}_graph", inputs,
                                  [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs],
                                  self.initializers)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=ir_version,
                                  producer_name=producer[0], producer_version=producer[1])
        # Output shapes as onnx infers them (a producer writes them; intermediate value_info it may not).
        inferred = shape_inference.infer_shapes(model, strict_mode=True).graph.output
        for output, typed in zip(model.graph.output, inferred):
            output.type.CopyFrom(typed.type)
        return model


def _input(name: str, dims: list[int | str]) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, dims)


# ----------------------------------------------------------------------------------------------- hand-written


def paddle2onnx() -> onnx.ModelProto:
    """paddle2onnx (PaddlePaddle, opset 11): every weight a ``Constant`` node; a ``conv2d`` without bias followed by
    its ``elementwise_add`` as ``Add`` of a (1,C,1,1) constant, then the BN; a ``conv2d_transpose`` the same way;
    the batch written ``dim_value -1`` on one input and ``dim_param "p2o.DynamicDimension.0"`` on the other."""
    g = _Graph(1, constant_nodes=True)
    y = g.op("Add", g.conv("x", 3, 8, bias=False), g.param("bias", g.normal((1, 8, 1, 1), 0.1)))
    y = g.op("Relu", g.batch_norm(y, 8))
    weight = g.param("weight", g.normal((4, 6, 2, 2), np.sqrt(2.0 / 16)))
    z = g.op("Add", g.op("ConvTranspose", "x2", weight, strides=[2, 2]), g.param("bias", g.normal((1, 6, 1, 1), 0.1)))
    z = g.batch_norm(z, 6)
    return g.model([_input("x", [-1, 3, 8, 8]), _input("x2", ["p2o.DynamicDimension.0", 4, 5, 5])], [y, z],
                   opset=11, ir_version=6, producer=("PaddlePaddle", "2.6"))


def tf2onnx_nhwc() -> onnx.ModelProto:
    """tf2onnx (opset 13) of a Keras NHWC model: the input ``input_1:0`` is NHWC with a ``unk__`` batch; each Conv is
    wrapped in ``Transpose(0,3,1,2)`` / ``Transpose(0,2,3,1)``; a Keras BatchNormalization becomes ``Mul``/``Add``
    by per-channel constants on the last axis (TensorFlow has already resolved it to ``x * s + t``), and a fused
    BN becomes a ``BatchNormalization`` with its own Transpose pair around it (epsilon 0.001), right after the
    conv's transpose back to NHWC."""
    g = _Graph(2)
    y = g.op("Transpose", g.conv(g.op("Transpose", "input_1:0", perm=NCHW), 3, 8), perm=NHWC)
    s, t = g.bn_affine(8, 1e-3)
    y = g.op("Relu", g.op("Add", g.op("Mul", y, g.param("scale", s)), g.param("shift", t)))
    y = g.op("Transpose", g.conv(g.op("Transpose", y, perm=NCHW), 8, 8), perm=NHWC)
    y = g.op("Transpose", g.batch_norm(g.op("Transpose", y, perm=NCHW), 8, epsilon=1e-3), perm=NHWC)
    return g.model([_input("input_1:0", ["unk__0", 8, 8, 3])], [y], opset=13, ir_version=7,
                   producer=("tf2onnx", "1.16.1"))


def frozen_bn_mul_add() -> onnx.ModelProto:
    """FrozenBatchNorm2d (torchvision, detectron2) exported with constant folding: a bias-less Conv, then ``Mul`` by
    a (1,C,1,1) scale and ``Add`` of a (1,C,1,1) shift; and a hand-written BN, ``(x - mean) / sqrt(var + eps) *
    gamma + beta``, as ``Sub`` -> ``Div`` -> ``Mul`` -> ``Add`` with the denominator computed in the graph
    (``Sqrt(Add(var, eps))``), after a Conv with bias."""
    g = _Graph(3)
    s, t = g.bn_affine(8)
    y = g.op("Add", g.op("Mul", g.conv("x", 3, 8, bias=False), g.param("scale", s.reshape(1, 8, 1, 1))),
             g.param("shift", t.reshape(1, 8, 1, 1)))
    y = g.op("Relu", y)
    scale, shift, mean, var = (v.reshape(1, 8, 1, 1) for v in g.bn_stats(8))
    std = g.op("Sqrt", g.op("Add", g.param("var", var), g.param("eps", np.array(1e-5))))
    y = g.op("Div", g.op("Sub", g.conv(y, 8, 8), g.param("mean", mean)), std)
    y = g.op("Add", g.op("Mul", y, g.param("gamma", scale)), g.param("beta", shift))
    return g.model([_input("x", ["batch", 3, 8, 8])], [y], opset=17, ir_version=8, producer=("pytorch", "2.13.0"))


def _concat_then_conv() -> onnx.ModelProto:
    """Two convs -> Concat -> BN -> Relu -> Conv -> BN -> GlobalAveragePool -> Flatten -> Gemm -> BN (opset 17)."""
    g = _Graph(4)
    y = g.op("Concat", g.conv("x", 3, 4), g.conv("x", 3, 4, k=1), axis=1)
    y = g.batch_norm(g.conv(g.op("Relu", g.batch_norm(y, 8)), 8, 8), 8)
    y = g.op("Flatten", g.op("GlobalAveragePool", y), axis=1)
    y = g.op("Gemm", y, g.param("weight", g.normal((5, 8), np.sqrt(1.0 / 8))), g.param("bias", g.normal((5,), 0.1)),
             transB=1)
    return g.model([_input("x", ["N", 3, 8, 8])], [g.batch_norm(y, 5)], opset=17, ir_version=8,
                   producer=("bnfold-corpus", "1"))


def ort_basic(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` optimised by onnxruntime at ``ORT_ENABLE_BASIC``, saved offline (``optimized_model_filepath``) and
    loaded back, as a deployment would ship it."""
    with tempfile.TemporaryDirectory(prefix="onnx-corpus-") as tmp:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        options.optimized_model_filepath = str(Path(tmp) / "basic.onnx")
        options.log_severity_level = 3
        ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        return onnx.load(options.optimized_model_filepath)


def ort_basic_output() -> onnx.ModelProto:
    """onnxruntime's basic level, saved offline, of :func:`_concat_then_conv`: it has folded the Conv+BN and left the
    BN after the Concat and the BN after the Gemm, in a graph it wrote itself (its node names, constants folded)."""
    return ort_basic(_concat_then_conv())


def old_opset7_spatial() -> onnx.ModelProto:
    """An opset-7 file (IR 3, as the exporters of that time wrote it: every initializer listed as a graph input):
    ``BatchNormalization-7`` with ``spatial=1`` after a Conv and after a Gemm."""
    g = _Graph(5)
    y = g.op("Relu", g.batch_norm(g.conv("x", 3, 6), 6, spatial=1))
    y = g.op("Flatten", g.op("GlobalAveragePool", y), axis=1)
    y = g.op("Gemm", y, g.param("weight", g.normal((4, 6), np.sqrt(1.0 / 6))), g.param("bias", g.normal((4,), 0.1)),
             transB=1)
    return g.model([_input("x", ["N", 3, 8, 8])], [g.batch_norm(y, 4, spatial=1, epsilon=1e-3)], opset=7,
                   ir_version=3, producer=("onnx-caffe2", "1.0"), listed=True)


def old_ir3_opset9() -> onnx.ModelProto:
    """Opset 9 written as IR 3: every initializer also listed as a graph input. onnxruntime reads them as constants
    there (only from IR 4 can a caller override one); Conv -> BN -> Relu -> ConvTranspose -> BN."""
    g = _Graph(6)
    y = g.op("Relu", g.batch_norm(g.conv("x", 3, 6), 6))
    weight = g.param("weight", g.normal((6, 4, 2, 2), np.sqrt(2.0 / 24)))
    y = g.op("ConvTranspose", y, weight, g.param("bias", g.normal((4,), 0.1)), strides=[2, 2])
    return g.model([_input("x", ["N", 3, 8, 8])], [g.batch_norm(y, 4)], opset=9, ir_version=3,
                   producer=("pytorch", "1.0"), listed=True)


def constant_value_floats() -> onnx.ModelProto:
    """BN parameters as ``Constant`` nodes with ``value_floats`` (as some converters, and onnx's own text format,
    write small constants); after the Gemm, a ``Mul`` by a ``value_float`` scalar and an ``Add`` of ``value_floats``
    (a BN already resolved to ``x * s + t``, with one scale for every channel)."""
    g = _Graph(7)
    bn = [g.constant(n, value_floats=v.tolist()) for n, v in zip(("scale", "B", "mean", "var"), g.bn_stats(6))]
    y = g.op("Relu", g.op("BatchNormalization", g.conv("x", 3, 6, bias=False), *bn, epsilon=1e-3))
    y = g.op("Flatten", g.op("GlobalAveragePool", y), axis=1)
    y = g.op("Gemm", y, g.param("weight", g.normal((5, 6), np.sqrt(1.0 / 6))), transB=1)
    scale = g.constant("scale", value_float=0.8)
    y = g.op("Add", g.op("Mul", y, scale), g.constant("shift", value_floats=g.normal((5,), 0.1).tolist()))
    return g.model([_input("x", ["N", 3, 8, 8])], [y], opset=13, ir_version=7, producer=("bnfold-corpus", "1"))


# ----------------------------------------------------------------------------------------------- torch exports


class _ConvNet(nn.Module):
    """conv-bn-relu x2 (the second conv bias-less), global average pool, linear, BatchNorm1d."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                      nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 5)
        self.bn_fc = nn.BatchNorm1d(5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn_fc(self.fc(torch.flatten(self.pool(self.features(x)), 1)))


def convnet() -> tuple[nn.Module, torch.Tensor]:
    """The seeded eval-mode :class:`_ConvNet` (BN statistics as ``models.zoo`` draws them) and an example input."""
    generator = torch.Generator().manual_seed(8)
    torch.manual_seed(8)
    model = randomize_bn_statistics(_ConvNet(), generator).eval()
    return model, torch.randn(BATCH, 3, 8, 8, generator=generator)


def torch_opset9() -> onnx.ModelProto:
    """The TorchScript exporter at opset 9 without constant folding (``torch.onnx.export(..., opset_version=9,
    do_constant_folding=False, dynamo=False)``): every BN stays a ``BatchNormalization`` (the one after the Gemm on a
    2-D input), Linear is ``Gemm``, the batch is ``dim_param "batch"``; IR 4."""
    model, x = convnet()
    buffer = io.BytesIO()
    with captured_output(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), buffer, opset_version=9, do_constant_folding=False, dynamo=False,
                          input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}})
    return onnx.load_from_string(buffer.getvalue())


@functools.cache
def _dynamo_bytes() -> bytes:
    """The slow export (seconds), done once per process."""
    model, x = convnet()
    with captured_output(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(model, (x,), dynamo=True, optimize=False,
                                    dynamic_shapes=({0: torch.export.Dim("batch")},))
    return program.model_proto.SerializeToString()


def dynamo_unoptimized() -> onnx.ModelProto:
    """The torch.export-based exporter without onnxscript's optimizer (``torch.onnx.export(..., dynamo=True,
    optimize=False)``, opset 18+): the bias-less conv reads a bias computed in the graph (``Expand`` of a zero
    ``Constant`` to ``Shape(weight)[0]``), the flatten is a ``Reshape`` of a computed shape; built once per process
    (cached bytes, a fresh proto each call)."""
    return onnx.load_from_string(_dynamo_bytes())


#: Producer spelling -> builder of a fresh, seeded model.
CORPUS: dict[str, Callable[[], onnx.ModelProto]] = {
    "paddle2onnx": paddle2onnx,
    "tf2onnx_nhwc": tf2onnx_nhwc,
    "torch_opset9": torch_opset9,
    "frozen_bn_mul_add": frozen_bn_mul_add,
    "ort_basic_output": ort_basic_output,
    "dynamo_unoptimized": dynamo_unoptimized,
    "old_opset7_spatial": old_opset7_spatial,
    "old_ir3_opset9": old_ir3_opset9,
    "constant_value_floats": constant_value_floats,
}


# ----------------------------------------------------------------------------------------------- measuring


def fed_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """The graph inputs a caller feeds: not initializers (IR < 4 lists them as inputs too)."""
    initializers = {t.name for t in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in initializers]


def example_feeds(model: onnx.ModelProto, seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded standard-normal float32 values for every fed input; a dynamic dimension is :data:`BATCH`."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for info in fed_inputs(model):
        dims = info.type.tensor_type.shape.dim
        shape = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else BATCH for d in dims]
        feeds[info.name] = rng.standard_normal(shape).astype(np.float32)
    return feeds


def run_plain(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Outputs of onnxruntime with every graph optimisation off."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


@dataclass(frozen=True)
class Parity:
    """The largest ``|got - reference|`` over every output element, and the output scale ``max |reference|``;
    truthy when ``max_abs <= RTOL * scale + ATOL`` (inf: an output is missing, of another shape, or not finite)."""

    max_abs: float
    scale: float

    def __bool__(self) -> bool:
        return self.max_abs <= RTOL * self.scale + ATOL

    @property
    def rel(self) -> float:
        return self.max_abs / (self.scale or 1.0)


def parity(reference: list[np.ndarray], got: list[np.ndarray]) -> Parity:
    """``got`` against ``reference``, output by output in graph order."""
    scale = max((float(np.abs(r).max(initial=0.0)) for r in reference), default=0.0)
    if len(reference) != len(got) or any(np.shape(r) != np.shape(g) for r, g in zip(reference, got)):
        return Parity(float("inf"), scale)
    diffs = [np.abs(np.asarray(g, np.float64) - r).max(initial=0.0) for r, g in zip(reference, got)]
    worst = float(np.max(diffs)) if diffs else 0.0  # NaN propagates, and fails
    return Parity(worst if np.isfinite(worst) else float("inf"), scale)


class Left(NamedTuple):
    """What a graph still holds: BatchNormalization nodes and affine chains (see the module docstring)."""

    bn: int
    affine: int


def left(model: onnx.ModelProto) -> Left:
    """The BatchNormalization nodes and the affine chains in ``model``'s main graph (the corpus has no subgraphs)."""
    graph = model.graph
    shapes = _constant_shapes(model)
    consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            consumers[name].append(node)
    chains = [_affine_chain(node.output[0], consumers, shapes) for node in graph.node if node.op_type in LAYERS]
    affine = sum(any(op in SCALES for op in ops) and any(op in SHIFTS for op in ops) for ops in chains)
    return Left(sum(node.op_type == "BatchNormalization" for node in graph.node), affine)


def _affine_chain(tensor: str, consumers: dict[str, list[onnx.NodeProto]],
                  shapes: dict[str, tuple[int, ...] | None]) -> list[str]:
    """The elementwise ops by per-channel constants that follow ``tensor`` alone (through Transposes)."""
    ops = []
    while len(consumers[tensor]) == 1:
        node = consumers[tensor][0]
        if node.op_type in SCALES + SHIFTS and len(node.input) == 2:
            first = node.input[0] == tensor
            other = node.input[1] if first else node.input[0]
            inverted = node.op_type in ("Div", "Sub") and not first  # c / x and c - x are not affine in x
            if inverted or other not in shapes or not _per_channel(shapes[other]):
                break
            ops.append(node.op_type)
        elif node.op_type != "Transpose":
            break
        tensor = node.output[0]
    return ops


def _per_channel(shape: tuple[int, ...] | None) -> bool:
    return shape is None or sum(d != 1 for d in shape) <= 1


def _constant_shapes(model: onnx.ModelProto) -> dict[str, tuple[int, ...] | None]:
    """Every constant tensor's shape (None: unknown)."""
    graph = model.graph
    fed = {i.name for i in fed_inputs(model)} if model.ir_version < 4 else {i.name for i in graph.input}
    shapes: dict[str, tuple[int, ...] | None] = {t.name: tuple(t.dims) for t in graph.initializer if t.name not in fed}
    try:
        inferred = {v.name: v.type.tensor_type.shape for v in shape_inference.infer_shapes(model).graph.value_info}
    except Exception:  # noqa: BLE001 - a graph onnx cannot infer: computed constants' shapes stay unknown
        inferred = {}
    for node in graph.node:
        if node.op_type == "Constant":
            shapes[node.output[0]] = _constant_node_shape(node)
        elif node.input and all(name in shapes for name in node.input if name):
            for out in node.output:
                shape = inferred.get(out)
                known = shape is not None and all(d.HasField("dim_value") for d in shape.dim)
                shapes[out] = tuple(d.dim_value for d in shape.dim) if known else None
    return shapes


def _constant_node_shape(node: onnx.NodeProto) -> tuple[int, ...] | None:
    attr = node.attribute[0] if node.attribute else None
    if attr is None:
        return None
    if attr.type == onnx.AttributeProto.TENSOR:
        return tuple(attr.t.dims)
    if attr.type in (onnx.AttributeProto.FLOATS, onnx.AttributeProto.INTS):
        return (len(attr.floats) + len(attr.ints),)
    if attr.type in (onnx.AttributeProto.FLOAT, onnx.AttributeProto.INT):
        return ()
    return None
