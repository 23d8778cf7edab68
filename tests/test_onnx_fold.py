"""Folding BatchNormalization in ONNX graphs: every pattern that folds, every one that must not, dtypes, opsets,
external data, and reference models exported from PyTorch.

Each positive case is checked four ways: the number of folds, no BatchNormalization left, onnx.checker (full
check), and onnxruntime parity with graph optimisations off against the original graph run the same way
(fp32: max |folded - original| <= 1e-5 + 1e-4 * max |original|).
"""

from __future__ import annotations

import os

import ml_dtypes
import numpy as np
import onnx
import onnx.parser
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, numpy_helper

from bnfold.errors import LoadError
from bnfold.fold.math import BNParams, fold_bn_after
from bnfold.onnx.fold import discover_graph, fold_graph
from bnfold.onnx.graph import MAX_OPSET
from bnfold.onnx.io import has_external_data, load_onnx, save_onnx
from models import zoo
from tests.onnx_graphs import as_float32, build, feeds, op_count, run

# IR 3 lists every initializer as a graph input too (so none is a constant): opset 7 is tested with IR 4.
IR_FOR_OPSET = {7: 4, 9: 4, 17: 8, 22: 10}
ATOL, RTOL = 1e-5, 1e-4


def header(opset: int = 17) -> str:
    return f'<ir_version: {IR_FOR_OPSET.get(opset, 8)}, opset_import: ["" : {opset}]>\n'


BN = "BatchNormalization"

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

# Parameters as Constant nodes (value, value_floats) count as constants.
CONSTANT_NODES = header() + """g (float[N,2,4,4] x) => (float[N,2,4,4] y) {
    w = Constant <value = float[2,2,1,1] {0.5, -1.0, 0.25, 2.0}> ()
    s = Constant <value_floats = [1.5, 0.5]> ()
    b = Constant <value = float[2] {0.1, -0.2}> ()
    m = Constant <value = float[2] {0.3, 0.4}> ()
    v = Constant <value = float[2] {0.9, 1.7}> ()
    z = Conv (x, w)
    y = BatchNormalization (z, s, b, m, v)
}"""

# name: (graph, build() keyword arguments, what the skip reason must say)
SKIPS = {
    # Padded zeros are not normalised: BN before a padded conv (explicit pads or SAME) must not fold.
    "bn_padded_conv": ("""g (float[N,4,8,8] x, float[4] s, float[4] b, float[4] m, float[4] v, float[3,4,3,3] w)
                        => (float[N,3,8,8] y) {
        z = BatchNormalization (x, s, b, m, v)
        y = Conv <pads = [1,1,1,1]> (z, w)
    }""", {}, "feeds padded conv Conv#1"),
    "bn_same_conv": ("""g (float[N,4,8,8] x, float[4] s, float[4] b, float[4] m, float[4] v, float[3,4,3,3] w)
                      => (float[N,3,8,8] y) {
        z = BatchNormalization (x, s, b, m, v)
        y = Conv <auto_pad = "SAME_LOWER"> (z, w)
    }""", {}, "padded conv"),
    # A weight fed at run time: nothing to fold into.
    "weight_graph_input": ("""g (float[N,3,4,4] x, float[4,3,1,1] w, float[4] s, float[4] b, float[4] m, float[4] v)
                            => (float[N,4,4,4] y) {
        z = Conv (x, w)
        y = BatchNormalization (z, s, b, m, v)
    }""", {"constants": ("s", "b", "m", "v")}, "follows Conv#0, whose weight 'w' is a graph input"),
    "scale_graph_input": ("""g (float[N,3,4,4] x, float[4,3,1,1] w, float[4] s, float[4] b, float[4] m, float[4] v)
                           => (float[N,4,4,4] y) {
        z = Conv (x, w)
        y = BatchNormalization (z, s, b, m, v)
    }""", {"constants": ("w", "b", "m", "v")}, "scale 's' is a graph input"),
    # IR < 4 style: an initializer also listed as a graph input is only a default value.
    "var_initializer_listed_as_input": ("""g (float[N,3,4,4] x, float[4,3,1,1] w, float[4] s, float[4] b, float[4] m,
                                         float[4] v) => (float[N,4,4,4] y) {
        z = Conv (x, w)
        y = BatchNormalization (z, s, b, m, v)
    }""", {"listed": ("v",)}, "var 'v' is an initializer also listed as a graph input"),
    # (a weight computed from constants alone is evaluated and folds: see test_onnx_structural.py)
    "weight_computed": ("""g (float[N,3,4,4] x, float[4,3,1,1] w0, float[4,3,1,1] d, float[4] s, float[4] b, float[4] m,
                           float[4] v) => (float[N,4,4,4] y) {
        w = Add (w0, d)
        z = Conv (x, w)
        y = BatchNormalization (z, s, b, m, v)
    }""", {"listed": ("d",)}, "weight 'w' is computed by node Add#0"),
    # The producer's output is read elsewhere too, or is itself a graph output.
    "shared_producer_output": ("""g (float[N,3,4,4] x, float[4,3,1,1] w, float[4] s, float[4] b, float[4] m,
                                float[4] v) => (float[N,4,4,4] y, float[N,4,4,4] r) {
        z = Conv (x, w)
        y = BatchNormalization (z, s, b, m, v)
        r = Relu (z)
    }""", {}, "output of Conv#0 also feeds Relu#2"),
    "producer_output_is_graph_output": ("""g (float[N,3,4,4] x, float[4,3,1,1] w, float[4] s, float[4] b, float[4] m,
                                         float[4] v) => (float[N,4,4,4] y, float[N,4,4,4] z) {
        z = Conv (x, w)
        y = BatchNormalization (z, s, b, m, v)
    }""", {}, "also feeds the model output"),
    # Batch statistics at inference: BN009, not folded.
    "training_mode": ("""g (float[N,3,4,4] x, float[4,3,1,1] w, float[4] s, float[4] b, float[4] m, float[4] v)
                       => (float[N,4,4,4] y, float[4] rm, float[4] rv) {
        z = Conv (x, w)
        y, rm, rv = BatchNormalization <training_mode = 1> (z, s, b, m, v)
    }""", {}, "BN009"),
    "bn_after_relu": ("""g (float[N,3,4,4] x, float[4,3,1,1] w, float[4] s, float[4] b, float[4] m, float[4] v)
                       => (float[N,4,4,4] y) {
        z = Conv (x, w)
        r = Relu (z)
        y = BatchNormalization (r, s, b, m, v)
    }""", {}, "not next to a conv/linear: input from Relu#1"),
    "matmul_weight_3d": ("""g (float[2,N,6] x, float[2,6,5] w, float[2] s, float[2] b, float[2] m, float[2] v)
                          => (float[2,N,5] y) {
        z = MatMul (x, w)
        y = BatchNormalization (z, s, b, m, v)
    }""", {}, "only a 2-D constant weight folds"),
    "matmul_two_activations": ("""g (float[N,6] x, float[6,5] w, float[5] s, float[5] b, float[5] m, float[5] v)
                                => (float[N,5] y) {
        z = MatMul (x, w)
        y = BatchNormalization (z, s, b, m, v)
    }""", {"constants": ("s", "b", "m", "v")}, "weight 'w' is a graph input"),
    # MatMul on a rank-3 input: BN axis 1 is not the feature axis.
    "matmul_rank3": ("""g (float[N,4,6] x, float[6,5] w, float[4] s, float[4] b, float[4] m, float[4] v)
                      => (float[N,4,5] y) {
        z = MatMul (x, w)
        y = BatchNormalization (z, s, b, m, v)
    }""", {}, "has rank 3"),
    # transA=1: a BN on A normalises the rows of the product, not its input features.
    "bn_gemm_transa": ("""g (float[6,4] x, float[4] s, float[4] b, float[4] m, float[4] v, float[5,6] w)
                        => (float[4,5] y) {
        z = BatchNormalization (x, s, b, m, v)
        y = Gemm <transA = 1, transB = 1> (z, w)
    }""", {}, "transA=1"),
}


def _check(original: onnx.ModelProto, folded: onnx.ModelProto, atol: float = ATOL, rtol: float = RTOL) -> None:
    onnx.checker.check_model(folded, full_check=True)
    assert [i.name for i in folded.graph.input] == [i.name for i in original.graph.input]
    assert [o.name for o in folded.graph.output] == [o.name for o in original.graph.output]
    inputs = feeds(original)
    for ref, got in zip(run(original, inputs), run(folded, inputs)):
        ref64, got64 = ref.astype(np.float64), got.astype(np.float64)
        error, limit = np.abs(got64 - ref64).max(), atol + rtol * np.abs(ref64).max()
        assert error <= limit, f"max error {error:.3g} > {limit:.3g}"


@pytest.mark.parametrize("name", list(FOLDS))
def test_folds(name):
    text, n_folds = FOLDS[name]
    model = build(header() + text)
    before = model.SerializeToString()
    result = fold_graph(model)
    assert model.SerializeToString() == before, "fold_graph changed its input"
    assert len(result.folded) == n_folds, result.skipped
    assert not result.skipped
    assert op_count(result.model, BN) == 0
    _check(model, result.model)
    assert discover_graph(result.model).folds == []
    used = {n for node in result.model.graph.node for n in node.input}
    assert all(t.name in used for t in result.model.graph.initializer), "an unused initializer was kept"


def test_shared_weight_is_copied_not_changed_for_the_other_reader():
    model = build(header() + FOLDS["shared_weight_one_folds"][0])
    result = fold_graph(model)
    plain = next(n for n in result.model.graph.node if n.output[0] == "y2")
    assert plain.input[1] == "w"
    kept = next(t for t in result.model.graph.initializer if t.name == "w")
    original = next(t for t in model.graph.initializer if t.name == "w")
    assert numpy_helper.to_array(kept).tobytes() == numpy_helper.to_array(original).tobytes()
    assert any("read by other nodes too" in note for note in result.notes)


def test_gemm_alpha_beta_become_one():
    model = build(header() + FOLDS["gemm_alpha_beta"][0])
    gemm = next(n for n in fold_graph(model).model.graph.node if n.op_type == "Gemm")
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in gemm.attribute}
    assert attrs["alpha"] == 1.0 and attrs["beta"] == 1.0


def test_constant_nodes_count_as_constants():
    model = onnx.parser.parse_model(CONSTANT_NODES)
    result = fold_graph(model)
    assert len(result.folded) == 1 and op_count(result.model, BN) == 0
    assert op_count(result.model, "Constant") == 1  # the folded weight; the BN's are dropped, the bias is new
    assert [t.name for t in result.model.graph.initializer] == ["w_bias"]
    _check(model, result.model)


@pytest.mark.parametrize("name", list(SKIPS))
def test_must_not_fold(name):
    text, kwargs, reason = SKIPS[name]
    model = build(header() + text, **kwargs)
    result = fold_graph(model)
    assert result.folded == []
    assert len(result.skipped) == 1
    assert reason in result.skipped[0].reason, result.skipped[0].reason
    assert op_count(result.model, BN) == 1
    onnx.checker.check_model(result.model, full_check=True)
    assert discover_graph(model).skips == result.skipped


def test_matmul_of_unknown_rank_is_not_folded():
    model = build(header() + FOLDS["matmul"][0])
    model.graph.input[0].type.tensor_type.ClearField("shape")
    (skip,) = fold_graph(model).skipped
    assert "follows MatMul#0, whose input 'x' has unknown rank" in skip.reason


def test_training_mode_reason_speaks_of_batch_statistics():
    model = build(header() + SKIPS["training_mode"][0])
    (skip,) = fold_graph(model).skipped
    assert "batch statistics" in skip.reason and "eval mode" in skip.reason


def test_batchnorm_inside_a_subgraph_is_reported():
    text = header() + """g (bool c, float[N,4] x, float[4] s, float[4] b, float[4] m, float[4] v) => (float[N,4] y) {
        y = If (c) <then_branch = t () => (float[N,4] yt) { yt = BatchNormalization (x, s, b, m, v) },
                    else_branch = e () => (float[N,4] ye) { ye = Identity (x) }>
    }"""
    model = build(text, constants=("s", "b", "m", "v"))
    result = fold_graph(model)
    assert [s.bn for s in result.skipped] == ["If#0/BatchNormalization#0"]
    assert "inside a subgraph" in result.skipped[0].reason
    onnx.checker.check_model(result.model, full_check=True)


# -- opsets --------------------------------------------------------------------------------------------------
OPSET9 = """g (float[N,3,6,6] x, float[4,3,3,3] w, float[4] s1, float[4] b1, float[4] m1, float[4] v1, float[5,64] g,
              float[5] c, float[5] s2, float[5] b2, float[5] m2, float[5] v2, float[2] shape) => (float[N,5] y) {
    z = Conv (x, w)
    a = BatchNormalization (z, s1, b1, m1, v1)
    f = Flatten (a)
    h = Gemm <transB = 1> (f, g, c)
    y = BatchNormalization (h, s2, b2, m2, v2)
}"""


def test_opset_9():
    model = build(header(9) + OPSET9.replace(", float[2] shape", ""))
    result = fold_graph(model)
    assert len(result.folded) == 2 and op_count(result.model, BN) == 0
    _check(model, result.model)


def test_opset_7_spatial():
    text = """g (float[N,3,6,6] x, float[4,3,3,3] w, float[4] s, float[4] b, float[4] m, float[4] v) => (float[N,4,4,4] y) {
        z = Conv (x, w)
        y = BatchNormalization <spatial = SPATIAL> (z, s, b, m, v)
    }"""
    model = build(header(7) + text.replace("SPATIAL", "1"))
    result = fold_graph(model)
    assert len(result.folded) == 1
    _check(model, result.model)
    per_position = build(header(7) + text.replace("SPATIAL", "0"))
    (skip,) = fold_graph(per_position).skipped
    assert "spatial=0" in skip.reason


@pytest.mark.parametrize("opset, words", [(6, "older than bnfold folds"), (MAX_OPSET + 1, "newer than the installed")])
def test_unsupported_opsets_are_load_errors(opset, words):
    model = onnx.parser.parse_model(f'<ir_version: 8, opset_import: ["" : {opset}]>\n'
                                    "g (float[2] x) => (float[2] y) { y = Relu (x) }")
    with pytest.raises(LoadError, match=words):
        fold_graph(model)
    with pytest.raises(LoadError, match=words):
        discover_graph(model)


def test_unknown_domain_is_a_load_error(tmp_path):
    model = onnx.parser.parse_model('<ir_version: 8, opset_import: ["" : 17, "com.example" : 1]>\n'
                                    "g (float[2] x) => (float[2] y) { y = com.example.Frob (x) }")
    path = tmp_path / "custom.onnx"
    onnx.save(model, path)
    with pytest.raises(LoadError, match="domain 'com.example'"):
        load_onnx(path)


def test_invalid_protobuf_is_a_load_error(tmp_path):
    path = tmp_path / "broken.onnx"
    path.write_bytes(b"\x0a\xff\xff\xff\xff\x0f garbage")
    with pytest.raises(LoadError, match="not an ONNX model") as info:
        load_onnx(path)
    assert "\n" not in info.value.message


# -- dtypes --------------------------------------------------------------------------------------------------
def _typed(text: str, dtype: str) -> str:
    return text.replace("float[", f"{dtype}[")


FP16_CASES = ["conv_bias", "conv_transpose_grouped", "gemm_alpha_beta", "bn_conv_unpadded", "matmul_add"]


@pytest.mark.parametrize("name", FP16_CASES)
def test_float16_fold_is_no_worse_than_the_float16_graph(name):
    """The fp32 graph (same fp16-representable values) is the reference; the folded fp16 graph may err no more
    than the unfolded fp16 graph does, x1.1, plus one fp16 rounding of the largest output."""
    text = FOLDS[name][0]
    half = build(header() + _typed(text, "float16"))
    full = as_float32_from_half(half)
    result = fold_graph(half)
    assert len(result.folded) == 1 and op_count(result.model, BN) == 0
    assert {t.data_type for t in result.model.graph.initializer} == {TensorProto.FLOAT16}
    onnx.checker.check_model(result.model, full_check=True)
    inputs = feeds(half)
    reference = run(full, {k: v.astype(np.float32) for k, v in inputs.items()})[0].astype(np.float64)
    unfolded = np.abs(run(half, inputs)[0].astype(np.float64) - reference).max()
    folded = np.abs(run(result.model, inputs)[0].astype(np.float64) - reference).max()
    assert folded <= 1.1 * unfolded + 2**-11 * np.abs(reference).max(), (folded, unfolded)


def as_float32_from_half(model: onnx.ModelProto) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for tensor in copy.graph.initializer:
        tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor).astype(np.float32), tensor.name))
    for info in [*copy.graph.input, *copy.graph.output]:
        info.type.tensor_type.elem_type = TensorProto.FLOAT
    return copy


@pytest.mark.parametrize("name", ["conv_bias", "gemm_transb0_no_bias", "bn_gemm"])
def test_bfloat16_round_trips_and_matches_the_torch_fold(name):
    """onnxruntime has no bf16 kernels: the folded tensors are compared bit for bit with the torch-side fold, and
    the graphs are run with their bf16 values widened to fp32 (exact), where only the folded weights' one
    bf16 rounding separates them."""
    model = build(header(22) + _typed(FOLDS[name][0], "bfloat16"))
    result = fold_graph(model)
    assert len(result.folded) == 1 and op_count(result.model, BN) == 0
    assert {t.data_type for t in result.model.graph.initializer} == {TensorProto.BFLOAT16}
    onnx.checker.check_model(result.model, full_check=True)
    reloaded = onnx.load_model_from_string(result.model.SerializeToString())
    arrays = {t.name: numpy_helper.to_array(t) for t in reloaded.graph.initializer}
    assert all(a.dtype == ml_dtypes.bfloat16 for a in arrays.values())
    if name == "conv_bias":
        source = {t.name: torch.from_numpy(numpy_helper.to_array(t).view(np.int16).copy()).view(torch.bfloat16)
                  for t in model.graph.initializer}
        params = BNParams(source["m"], source["v"], 1e-3, source["s"], source["b"])
        weight, bias = fold_bn_after(source["w"], source["c"], params)
        assert arrays["w"].view(np.int16).tolist() == weight.view(torch.int16).numpy().tolist()
        assert arrays["c"].view(np.int16).tolist() == bias.view(torch.int16).numpy().tolist()
    _check(as_float32(model), as_float32(result.model), atol=0, rtol=2**-7)


def test_double():
    text = _typed(FOLDS["gemm_alpha_beta"][0], "double").replace("=> (double[N,5] y)", "=> (double[N,5] y)")
    model = build(header() + text)
    result = fold_graph(model)
    assert {t.data_type for t in result.model.graph.initializer} == {TensorProto.DOUBLE}
    _check(model, result.model, atol=1e-12, rtol=1e-12)


def test_overflowing_float16_fold_is_refused_with_a_reason():
    model = build(header() + _typed(FOLDS["conv_no_bias"][0], "float16"))
    var = next(t for t in model.graph.initializer if t.name == "v")
    var.CopyFrom(numpy_helper.from_array(np.full(5, 1e-7, np.float16), "v"))  # scale ~ 1 / sqrt(1e-5)
    weight = next(t for t in model.graph.initializer if t.name == "w")
    weight.CopyFrom(numpy_helper.from_array(np.full((5, 3, 1, 1), 1000.0, np.float16), "w"))
    result = fold_graph(model)
    (skip,) = result.skipped
    assert "overflow float16" in skip.reason
    assert op_count(result.model, BN) == 1


# -- random configurations, checked against onnxruntime ------------------------------------------------------
@st.composite
def layers(draw):
    kind = draw(st.sampled_from(["conv", "conv_transpose", "gemm"]))
    position = "after" if kind == "conv_transpose" else draw(st.sampled_from(["after", "before"]))
    groups = draw(st.sampled_from([1, 2, 3])) if kind != "gemm" else 1
    cin, cout = groups * draw(st.integers(1, 3)), groups * draw(st.integers(1, 3))
    kernel, stride = draw(st.integers(1, 3)), draw(st.integers(1, 2))
    pad = 0 if position == "before" else draw(st.integers(0, kernel - 1))
    return {"kind": kind, "position": position, "groups": groups, "cin": cin, "cout": cout, "kernel": kernel,
            "stride": stride, "pad": pad, "out_pad": draw(st.integers(0, stride - 1)), "trans_b": draw(st.booleans()),
            "bias": draw(st.booleans()), "small_var": draw(st.booleans()), "seed": draw(st.integers(0, 2**16))}


def layer_graph(c: dict) -> str:
    channels = c["cout"] if c["position"] == "after" else c["cin"]
    bias_decl, bias_arg = (f", float[{c['cout']}] c", ", c") if c["bias"] else ("", "")
    k, g = c["kernel"], c["groups"]
    if c["kind"] == "gemm":
        x, y = f"float[N,{c['cin']}]", "float[?,?]"
        shape = f"{c['cout']},{c['cin']}" if c["trans_b"] else f"{c['cin']},{c['cout']}"
        op = f"Gemm <transB = {int(c['trans_b'])}>"
    elif c["kind"] == "conv":
        x, y = f"float[N,{c['cin']},7,7]", "float[?,?,?,?]"
        shape = f"{c['cout']},{c['cin'] // g},{k},{k}"
        op = f"Conv <group = {g}, strides = [{c['stride']},{c['stride']}], pads = [{c['pad']},{c['pad']},{c['pad']},{c['pad']}]>"
    else:
        x, y = f"float[N,{c['cin']},5,5]", "float[?,?,?,?]"
        shape = f"{c['cin']},{c['cout'] // g},{k},{k}"
        op = (f"ConvTranspose <group = {g}, strides = [{c['stride']},{c['stride']}], "
              f"output_padding = [{c['out_pad']},{c['out_pad']}]>")
    params = f"float[{channels}] s, float[{channels}] b, float[{channels}] m, float[{channels}] v"
    if c["position"] == "after":
        body = f"z = {op} (x, w{bias_arg})\n y = BatchNormalization (z, s, b, m, v)"
    else:
        body = f"z = BatchNormalization (x, s, b, m, v)\n y = {op} (z, w{bias_arg})"
    return header() + f"g ({x} x, float[{shape}] w{bias_decl}, {params}) => ({y} y) {{\n {body}\n}}"


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(layers())
def test_random_layers_fold_exactly(config):
    model = build(layer_graph(config), seed=config["seed"], small_var=config["small_var"])
    result = fold_graph(model)
    assert len(result.folded) == 1, result.skipped
    assert op_count(result.model, BN) == 0
    _check(model, result.model)


# -- external data -------------------------------------------------------------------------------------------
# Weights of 4.5 KiB: above the 1 KiB under which tensors stay inline in the model file.
WIDE = header() + """g (float[N,8,6,6] x, float[16,8,3,3] w1, float[16] s1, float[16] b1, float[16] m1, float[16] v1,
                      float[8,16,3,3] w2, float[8] s2, float[8] b2, float[8] m2, float[8] v2) => (float[N,8,6,6] y) {
    z1 = Conv <pads = [1,1,1,1]> (x, w1)
    a1 = BatchNormalization (z1, s1, b1, m1, v1)
    r1 = Relu (a1)
    z2 = Conv <pads = [1,1,1,1]> (r1, w2)
    y = BatchNormalization (z2, s2, b2, m2, v2)
}"""


def test_external_data_round_trip(tmp_path):
    model = build(WIDE)
    (tmp_path / "in").mkdir()
    source = tmp_path / "in" / "model.onnx"
    onnx.save_model(build(WIDE), str(source), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="weights.bin", size_threshold=0)  # (save_model moves the data out of what it saves)
    assert has_external_data(source)
    loaded = load_onnx(source)
    result = fold_graph(loaded)
    out = tmp_path / "out.onnx"
    written = save_onnx(result.model, out, source=source)
    assert written == [out, tmp_path / "out.onnx.data"]
    assert has_external_data(out) and out.stat().st_size < 4096
    _check(model, load_onnx(out))
    onnx.checker.check_model(str(out), full_check=True)
    inputs = feeds(model)
    np.testing.assert_array_equal(run(str(out), inputs)[0], run(result.model, inputs)[0])


def test_inline_models_stay_one_file_unless_asked(tmp_path):
    result = fold_graph(build(WIDE))
    out = tmp_path / "out.onnx"
    assert save_onnx(result.model, out) == [out]
    assert not has_external_data(out)
    asked = tmp_path / "ext.onnx"
    assert save_onnx(result.model, asked, external_data=True) == [asked, tmp_path / "ext.onnx.data"]
    assert has_external_data(asked)


def test_models_over_the_size_limit_get_a_data_file(tmp_path):
    """Protobuf's 2 GB limit, lowered to a few kilobytes: the same code path as a real 2 GB model."""
    model = build(WIDE)
    result = fold_graph(model)
    size = len(result.model.SerializeToString())
    out = tmp_path / "big.onnx"
    assert save_onnx(result.model, out, size_threshold=size - 1) == [out, tmp_path / "big.onnx.data"]
    assert save_onnx(result.model, tmp_path / "fits.onnx", size_threshold=size + 1) == [tmp_path / "fits.onnx"]
    reloaded = load_onnx(out)
    for a, b in zip(reloaded.graph.initializer, result.model.graph.initializer):
        assert a.name == b.name and numpy_helper.to_array(a).tobytes() == numpy_helper.to_array(b).tobytes()
    _check(model, reloaded)


@pytest.mark.parametrize("location", ["../secret", "/etc/hostname", "sub/../../secret", "link/secret"])
def test_external_data_outside_the_model_folder_is_refused(tmp_path, location):
    folder = tmp_path / "model"
    folder.mkdir()
    (tmp_path / "secret").write_bytes(b"\0" * 1024)
    os.symlink(tmp_path, folder / "link")
    model = build(header() + FOLDS["conv_bias"][0])
    tensor = model.graph.initializer[0]
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    entry = tensor.external_data.add()
    entry.key, entry.value = "location", location
    path = folder / "model.onnx"
    path.write_bytes(model.SerializeToString())
    with pytest.raises(LoadError, match="outside the model's folder"):
        load_onnx(path)


def test_missing_data_file_is_a_load_error(tmp_path):
    source = tmp_path / "model.onnx"
    onnx.save_model(build(WIDE), str(source), save_as_external_data=True, location="weights.bin", size_threshold=0)
    (tmp_path / "weights.bin").unlink()
    with pytest.raises(LoadError, match="'weights.bin', which is missing"):
        load_onnx(source)


def test_external_data_false_still_writes_a_data_file_when_one_protobuf_cannot_hold_the_model(tmp_path):
    result = fold_graph(build(WIDE))
    before = result.model.SerializeToString()
    out = tmp_path / "out.onnx"
    assert save_onnx(result.model, out, external_data=False, size_threshold=4096)[1].name == "out.onnx.data"
    assert result.model.SerializeToString() == before, "save_onnx changed the model"


def test_keeps_names_metadata_and_doc_strings():
    model = build(header() + FOLDS["conv_bias"][0])
    model.producer_name, model.producer_version, model.doc_string = "maker", "1.2", "model doc"
    model.graph.doc_string = "graph doc"
    onnx.helper.set_model_props(model, {"author": "me"})
    model.graph.node[0].doc_string = "the conv"
    folded = fold_graph(model).model
    assert (folded.producer_name, folded.producer_version, folded.doc_string) == ("maker", "1.2", "model doc")
    assert folded.graph.doc_string == "graph doc"
    assert [(p.key, p.value) for p in folded.metadata_props] == [("author", "me")]
    assert folded.graph.node[0].doc_string == "the conv"
    assert list(folded.opset_import) == list(model.opset_import)


# -- reference models exported from PyTorch ------------------------------------------------------------------
@pytest.mark.parametrize("name", ["resnet_tiny", "decoder_tiny", "mlp_tiny"])
def test_reference_models_exported_with_torchscript(tmp_path, name):
    spec = zoo.get_spec(name)
    module = zoo.build(name)
    example = torch.randn(*spec.input_shape, generator=torch.Generator().manual_seed(0))
    path = tmp_path / f"{name}.onnx"
    torch.onnx.export(module, (example,), str(path), dynamo=False, do_constant_folding=False,
                      input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "n"}, "y": {0: "n"}})
    model = load_onnx(path)
    assert op_count(model, BN) > 0
    result = fold_graph(model)
    assert op_count(result.model, BN) == 0, result.skipped
    assert discover_graph(result.model).folds == []
    _check(model, result.model)
