"""Building small ONNX graphs from ONNX text, and running them in onnxruntime with graph optimisations off.

A graph is written in ONNX text with every parameter as a graph input; :func:`build` turns the named ones into
initializers filled with seeded random values, so a test reads as its topology. Names starting with ``v`` are
variances (positive); everything else is drawn around zero (BN scales: names starting with ``s``, near 1).

Also here, shared by several test files: :data:`FOLDS` (graphs that must fold) with :func:`_check` (the folded
graph against the original in onnxruntime), and the hand-made graphs of the attacks on bnfold's ONNX side
(:func:`graph`: a text whose free parameters become seeded initializers; :data:`LOOP_BN`, :data:`LOOP`: graphs
that run for days), with :func:`save` and the external-data writers.
"""

from __future__ import annotations

from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import onnx.parser
import onnxruntime as ort
import torch
from onnx import TensorProto, helper, numpy_helper

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


# -- the fold corpus: graphs every fold rule must fold, and the check of a folded graph ----------------------------
# IR 3 lists every initializer as a graph input too (so none is a constant): opset 7 is tested with IR 4.
IR_FOR_OPSET = {7: 4, 9: 4, 17: 8, 22: 10}
ATOL, RTOL = 1e-5, 1e-4


def header(opset: int = 17) -> str:
    return f'<ir_version: {IR_FOR_OPSET.get(opset, 8)}, opset_import: ["" : {opset}]>\n'


# Every graph input but x is made an initializer by build() (names starting with v are variances).
# name: (graph, number of folds)
FOLDS = {
    # Conv with bias, padded (padding is irrelevant when the BN comes after), epsilon given.
    "conv_bias": ("""g (float[N,3,8,8] x, float[4,3,3,3] w, float[4] c, float[4] s, float[4] b, float[4] m,
                       float[4] v) => (float[N,4,8,8] y) {
        z = Conv <pads = [1,1,1,1]> (x, w, c)
        y = BatchNormalization <epsilon = 0.001> (z, s, b, m, v)
    }""", 1),
    # Conv without bias: the fold adds input B.
    "conv_no_bias": ("""g (float[N,3,8,8] x, float[5,3,1,1] w, float[5] s, float[5] b, float[5] m, float[5] v)
                      => (float[N,5,8,8] y) {
        z = Conv (x, w)
        y = BatchNormalization (z, s, b, m, v)
    }""", 1),
    # Depthwise (group = channels) with dilation 2; stride 2 with auto_pad SAME_UPPER.
    "conv_depthwise_dilated": ("""g (float[N,4,9,9] x, float[4,1,3,3] w, float[4] s, float[4] b, float[4] m,
                                float[4] v) => (float[N,4,9,9] y) {
        z = Conv <group = 4, dilations = [2,2], pads = [2,2,2,2]> (x, w)
        y = BatchNormalization (z, s, b, m, v)
    }""", 1),
    "conv_same_upper_strided": ("""g (float[N,3,9,9] x, float[4,3,3,3] w, float[4] s, float[4] b, float[4] m,
                                 float[4] v) => (float[N,4,5,5] y) {
        z = Conv <strides = [2,2], auto_pad = "SAME_UPPER"> (x, w)
        y = BatchNormalization (z, s, b, m, v)
    }""", 1),
    # Two groups, 1-D.
    "conv1d_grouped": ("""g (float[N,4,16] x, float[6,2,3] w, float[6] c, float[6] s, float[6] b, float[6] m,
                        float[6] v) => (float[N,6,14] y) {
        z = Conv <group = 2> (x, w, c)
        y = BatchNormalization (z, s, b, m, v)
    }""", 1),
    # ConvTranspose: weight (in, out/groups, k, k), two groups, stride 2, output_padding.
    "conv_transpose_grouped": ("""g (float[N,4,5,5] x, float[4,3,3,3] w, float[6] c, float[6] s, float[6] b,
                                float[6] m, float[6] v) => (float[N,6,10,10] y) {
        z = ConvTranspose <group = 2, strides = [2,2], pads = [1,1,1,1], output_padding = [1,1]> (x, w, c)
        y = BatchNormalization (z, s, b, m, v)
    }""", 1),
    "conv_transpose_no_bias": ("""g (float[N,4,5,5] x, float[4,5,2,2] w, float[5] s, float[5] b, float[5] m,
                                float[5] v) => (float[N,5,10,10] y) {
        z = ConvTranspose <strides = [2,2]> (x, w)
        y = BatchNormalization (z, s, b, m, v)
    }""", 1),
    # Gemm: B (N, K) with transB=1 and C; B (K, N) with transB=0 and no C; alpha and beta folded in.
    "gemm_transb1_bias": ("""g (float[N,6] x, float[5,6] w, float[5] c, float[5] s, float[5] b, float[5] m,
                           float[5] v) => (float[N,5] y) {
        z = Gemm <transB = 1> (x, w, c)
        y = BatchNormalization (z, s, b, m, v)
    }""", 1),
    "gemm_transb0_no_bias": ("""g (float[N,6] x, float[6,5] w, float[5] s, float[5] b, float[5] m, float[5] v)
                              => (float[N,5] y) {
        z = Gemm (x, w)
        y = BatchNormalization (z, s, b, m, v)
    }""", 1),
    "gemm_alpha_beta": ("""g (float[N,6] x, float[6,5] w, float[1,5] c, float[5] s, float[5] b, float[5] m,
                         float[5] v) => (float[N,5] y) {
        z = Gemm <alpha = 0.5, beta = 2.5> (x, w, c)
        y = BatchNormalization (z, s, b, m, v)
    }""", 1),
    "gemm_alpha_no_bias": ("""g (float[N,6] x, float[5,6] w, float[5] s, float[5] b, float[5] m, float[5] v)
                            => (float[N,5] y) {
        z = Gemm <alpha = 1.5, beta = 3.0, transB = 1> (x, w)
        y = BatchNormalization (z, s, b, m, v)
    }""", 1),
    # MatMul with a constant 2-D weight (K, N): alone (an Add is added), and followed by its bias Add.
    "matmul": ("""g (float[N,6] x, float[6,5] w, float[5] s, float[5] b, float[5] m, float[5] v) => (float[N,5] y) {
        z = MatMul (x, w)
        y = BatchNormalization (z, s, b, m, v)
    }""", 1),
    "matmul_add": ("""g (float[N,6] x, float[6,5] w, float[5] c, float[5] s, float[5] b, float[5] m, float[5] v)
                    => (float[N,5] y) {
        z = MatMul (x, w)
        zb = Add (c, z)
        y = BatchNormalization (zb, s, b, m, v)
    }""", 1),
    # BN before a layer: Gemm (transB 1 with C, transB 0 without), MatMul (with and without its Add), unpadded Conv.
    "bn_gemm": ("""g (float[N,6] x, float[6] s, float[6] b, float[6] m, float[6] v, float[5,6] w, float[5] c)
                 => (float[N,5] y) {
        z = BatchNormalization (x, s, b, m, v)
        y = Gemm <transB = 1, alpha = 0.75> (z, w, c)
    }""", 1),
    "bn_gemm_transb0_no_bias": ("""g (float[N,6] x, float[6] s, float[6] b, float[6] m, float[6] v, float[6,5] w)
                                 => (float[N,5] y) {
        z = BatchNormalization (x, s, b, m, v)
        y = Gemm (z, w)
    }""", 1),
    "bn_matmul": ("""g (float[N,6] x, float[6] s, float[6] b, float[6] m, float[6] v, float[6,5] w) => (float[N,5] y) {
        z = BatchNormalization (x, s, b, m, v)
        y = MatMul (z, w)
    }""", 1),
    "bn_matmul_add": ("""g (float[N,6] x, float[6] s, float[6] b, float[6] m, float[6] v, float[6,5] w, float[5] c)
                       => (float[N,5] y) {
        z = BatchNormalization (x, s, b, m, v)
        zm = MatMul (z, w)
        y = Add (zm, c)
    }""", 1),
    "bn_conv_unpadded": ("""g (float[N,4,8,8] x, float[4] s, float[4] b, float[4] m, float[4] v, float[3,4,3,3] w,
                          float[3] c) => (float[N,3,6,6] y) {
        z = BatchNormalization (x, s, b, m, v)
        y = Conv (z, w, c)
    }""", 1),
    "bn_conv_grouped_valid": ("""g (float[N,4,8,8] x, float[4] s, float[4] b, float[4] m, float[4] v,
                               float[6,2,1,1] w) => (float[N,6,4,4] y) {
        z = BatchNormalization (x, s, b, m, v)
        y = Conv <group = 2, strides = [2,2], auto_pad = "VALID"> (z, w)
    }""", 1),
    # One conv absorbs a BN on each side: the second fold must see the bias the first one added.
    "bn_conv_bn": ("""g (float[N,4,8,8] x, float[4] s1, float[4] b1, float[4] m1, float[4] v1, float[3,4,1,1] w,
                    float[3] s2, float[3] b2, float[3] m2, float[3] v2) => (float[N,3,8,8] y) {
        z = BatchNormalization (x, s1, b1, m1, v1)
        zc = Conv (z, w)
        y = BatchNormalization (zc, s2, b2, m2, v2)
    }""", 2),
    "bn_matmul_bn": ("""g (float[N,6] x, float[6] s1, float[6] b1, float[6] m1, float[6] v1, float[6,5] w,
                      float[5] s2, float[5] b2, float[5] m2, float[5] v2) => (float[N,5] y) {
        z = BatchNormalization (x, s1, b1, m1, v1)
        zm = MatMul (z, w)
        y = BatchNormalization (zm, s2, b2, m2, v2)
    }""", 2),
    # One weight read by two convs, each followed by a BN: each folds into its own copy.
    "shared_weight_both_fold": ("""g (float[N,3,6,6] x, float[4,3,1,1] w, float[4] s1, float[4] b1, float[4] m1,
                                 float[4] v1, float[4] s2, float[4] b2, float[4] m2, float[4] v2)
                                 => (float[N,4,6,6] y1, float[N,4,6,6] y2) {
        z1 = Conv (x, w)
        y1 = BatchNormalization (z1, s1, b1, m1, v1)
        z2 = Conv (x, w)
        y2 = BatchNormalization (z2, s2, b2, m2, v2)
    }""", 2),
    # ... and when the other conv has no BN, it must keep the original weight.
    "shared_weight_one_folds": ("""g (float[N,3,6,6] x, float[4,3,1,1] w, float[4] s, float[4] b, float[4] m,
                                 float[4] v) => (float[N,4,6,6] y1, float[N,4,6,6] y2) {
        z1 = Conv (x, w)
        y1 = BatchNormalization (z1, s, b, m, v)
        y2 = Conv (x, w)
    }""", 1),
    # The BN output feeds the next layer (not a graph output), then a chain through a Relu.
    "conv_bn_relu_conv_bn": ("""g (float[N,3,8,8] x, float[4,3,3,3] w1, float[4] s1, float[4] b1, float[4] m1,
                              float[4] v1, float[2,4,3,3] w2, float[2] s2, float[2] b2, float[2] m2, float[2] v2)
                              => (float[N,2,8,8] y) {
        z1 = Conv <pads = [1,1,1,1]> (x, w1)
        a1 = BatchNormalization (z1, s1, b1, m1, v1)
        r1 = Relu (a1)
        z2 = Conv <pads = [1,1,1,1]> (r1, w2)
        y = BatchNormalization (z2, s2, b2, m2, v2)
    }""", 2),
}


def _check(original: onnx.ModelProto, folded: onnx.ModelProto, atol: float = ATOL, rtol: float = RTOL) -> None:
    onnx.checker.check_model(folded, full_check=True)
    assert [i.name for i in folded.graph.input] == [i.name for i in original.graph.input]
    assert [o.name for o in folded.graph.output] == [o.name for o in original.graph.output]
    inputs = feeds(original)
    for ref, got in zip(run(original, inputs), run(folded, inputs)):
        ref64, got64 = ref.astype(np.float64), got.astype(np.float64)
        finite = np.isfinite(ref64)  # an Inf or NaN must stay one, and not make the tolerance infinite
        assert np.array_equal(finite, np.isfinite(got64)), "the folded graph differs in which outputs are finite"
        assert np.array_equal(ref64[~finite], got64[~finite], equal_nan=True), "the non-finite outputs differ"
        error = np.abs(got64 - ref64)[finite].max(initial=0.0)
        limit = atol + rtol * np.abs(ref64[finite]).max(initial=0.0)
        assert error <= limit, f"max error {error:.3g} > {limit:.3g}"


# -- hand-made graphs with seeded initializers (the attacks on the ONNX side) --------------------------------------
CONV_BN = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N,2,4,4] x) => (float[N,3,4,4] y) {
    z = Conv <pads = [1,1,1,1]> (x, w)
    y = BatchNormalization (z, s, b, m, v)
}"""


# 10**12 trips of a cheap op: runs for days unless stopped.
LOOP_BN = """
<ir_version: 8, opset_import: ["" : 15]>
spin (float[N,2,4,4] x) => (float[N,3,4,4] y) {
    z = Conv <pads = [1,1,1,1]> (x, w)
    trips = Constant <value = int64 {1000000000000}> ()
    keep_going = Constant <value = bool {1}> ()
    l = Loop (trips, keep_going, z) <body = step (int64 i, bool cond, float[N,3,4,4] acc)
                                                => (bool cond_out, float[N,3,4,4] acc_out) {
        cond_out = Identity (cond)
        acc_out = Abs (acc)
    }>
    y = BatchNormalization (l, s, b, m, v)
}"""


# 10**12 trips of a cheap Add: runs for days unless stopped.
LOOP = """
<ir_version: 8, opset_import: ["" : 15]>
spin (float[1] x) => (float[1] y) {
    trips = Constant <value = int64 {1000000000000}> ()
    keep_going = Constant <value = bool {1}> ()
    y = Loop (trips, keep_going, x) <body = step (int64 i, bool cond, float[1] acc)
                                                => (bool cond_out, float[1] acc_out) {
        cond_out = Identity (cond)
        acc_out = Add (acc, acc)
    }>
}
"""

ONE = {"case": (torch.ones(1),)}


def params(channels: int = 3, in_channels: int = 2, seed: int = 0, **override) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    values = {"w": rng.normal(size=(channels, in_channels, 3, 3)) * 0.5, "s": rng.uniform(0.5, 1.5, channels),
              "b": rng.normal(size=channels), "m": rng.normal(size=channels), "v": rng.uniform(0.5, 2.0, channels)}
    values.update(override)
    return {k: np.asarray(v, dtype=np.float32) for k, v in values.items()}


def graph(text: str = CONV_BN, eps: float | None = None, **override) -> onnx.ModelProto:
    """``text`` with its free parameters (w, s, b, m, v and any suffixed copies) as seeded initializers."""
    model = onnx.parser.parse_model(text)
    declared = {name for node in model.graph.node for name in node.input} - {i.name for i in model.graph.input} - {
        out for node in model.graph.node for out in node.output}
    for name in sorted(declared):
        if not name:
            continue
        base = name.rstrip("0123456789")
        value = params(seed=len(name) + ord(name[-1]), **override)[base]
        model.graph.initializer.append(numpy_helper.from_array(value, name))
    if eps is not None:
        for node in model.graph.node:
            if node.op_type == "BatchNormalization":
                node.attribute.append(helper.make_attribute("epsilon", float(eps)))
    return model


def save(model: onnx.ModelProto | str, path: Path) -> Path:
    """Write ``model`` to ``path``: a ModelProto as its serialized bytes, ONNX text parsed first (``onnx.save``)."""
    if isinstance(model, str):
        onnx.save(onnx.parser.parse_model(model), str(path))
    else:
        path.write_bytes(model.SerializeToString())
    return path


def with_external(path: Path, location: str, *, tensor: str = "w", offset: int | None = None,
                  length: int | None = None, model: onnx.ModelProto | None = None) -> Path:
    """Write ``model`` (CONV_BN by default) to ``path`` with ``tensor``'s data declared at ``location``."""
    model = model or graph()
    target = next(t for t in model.graph.initializer if t.name == tensor)
    target.ClearField("raw_data")
    target.data_location = TensorProto.EXTERNAL
    entries = [("location", location)] + [(k, str(v)) for k, v in (("offset", offset), ("length", length))
                                          if v is not None]
    for key, value in entries:
        entry = target.external_data.add()
        entry.key, entry.value = key, value
    return save(model, path)


def with_data_file(folder: Path, name: str, location: str) -> Path:
    """A CONV_BN model ``folder/name`` whose tensors all live in ``folder/location`` (as onnx writes them)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    onnx.save_model(graph(), str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=location, size_threshold=0)
    return path
