"""Issue 15, item 2: a layer, a bias node, a BatchNormalization. Exporters such as paddle2onnx write a layer's bias as
a separate ``Add`` of a constant (and weights as ``Constant`` nodes): ``Conv/ConvTranspose/Gemm/MatMul -> Add(c) ->
BN`` folds, the constant becoming the layer's bias (added to its own), in either operand order, for ``layer - c``
too, with the constant an initializer or a ``Constant`` node.

Each positive case is checked as the other ONNX fold tests are (``tests/onnx_graphs.py``): one fold, nothing
skipped, no BatchNormalization and no bias node left, onnx.checker's full check, onnxruntime parity against the
unfolded graph. Each negative case keeps its BN with its reason and code.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, numpy_helper

from bnfold.fold.math import BNParams, fold_bn_after
from bnfold.onnx.fold import discover_graph, fold_graph
from tests.onnx_graphs import _check, build, header, op_count

BN = "BatchNormalization"
STATS4 = "float[4] s, float[4] b, float[4] m, float[4] v"
STATS6 = "float[6] s, float[6] b, float[6] m, float[6] v"
FOUR = "{0.5, -1.0, 0.25, 2.0}"


def conv_add(add: str, c: str = "float[1,4,1,1] c", conv: str = "Conv (x, w)", out: str = "float[N,4,5,5] y",
             w: str = "float[4,3,1,1] w", x: str = "float[N,3,5,5] x", stats: str = STATS4) -> str:
    """``x -> conv -> z``, the bias node line ``add`` (writing ``zb``), ``zb -> BN -> y``; ``c`` an input made an
    initializer by build() (empty: the constant is a Constant node inside ``add``)."""
    inputs = ", ".join(part for part in (x, w, c, stats) if part)
    return (f"g ({inputs}) => ({out}) {{\n    z = {conv}\n    {add}\n"
            "    y = BatchNormalization (zb, s, b, m, v)\n}")


# name: (graph, the layer op left, how many Add/Sub nodes are left)
FOLDS = {
    # the paddle2onnx spelling: a (1,C,1,1) initializer, the layer output first or second
    "conv_add_initializer": (conv_add("zb = Add (z, c)"), "Conv", 0),
    "conv_add_constant_first": (conv_add("zb = Add (c, z)"), "Conv", 0),
    # (C,1,1) broadcasts on axis 1 of NCHW too; a scalar, or a one-element vector, on every channel
    "conv_add_c11": (conv_add("zb = Add (z, c)", c="float[4,1,1] c"), "Conv", 0),
    "conv_add_scalar": (conv_add("zb = Add (z, c)", c="float c"), "Conv", 0),
    "conv_add_one_element": (conv_add("zb = Add (c, z)", c="float[1] c"), "Conv", 0),
    # the constant as a Constant node: a tensor value, a value_float scalar
    "conv_add_constant_node_value": (conv_add(
        f"k = Constant <value = float[1,4,1,1] {FOUR}> ()\n    zb = Add (k, z)", c=""), "Conv", 0),
    # paddle2onnx: the weight a Constant node too
    "conv_weight_and_bias_constant_nodes": (f"""g (float[N,1,5,5] x, {STATS4}) => (float[N,4,5,5] y) {{
        w = Constant <value = float[4,1,1,1] {FOUR}> ()
        z = Conv (x, w)
        k = Constant <value = float[1,4,1,1] {FOUR}> ()
        zb = Add (z, k)
        y = BatchNormalization (zb, s, b, m, v)
    }}""", "Conv", 0),
    "conv_add_constant_node_value_float": (conv_add(
        "k = Constant <value_float = 0.75> ()\n    zb = Add (z, k)", c=""), "Conv", 0),
    # layer - c: the bias is -c
    "conv_sub": (conv_add("zb = Sub (z, c)"), "Conv", 0),
    # the layer's own bias and the Add's constant: s * (b + c - mean) + beta
    "conv_own_bias_add": (conv_add("zb = Add (z, c)", conv="Conv <pads = [1,1,1,1]> (x, w, c0)",
                                   w="float[4,3,3,3] w, float[4] c0"), "Conv", 0),
    "conv_own_bias_sub_constant_node": (conv_add(
        f"k = Constant <value = float[4,1,1] {FOUR}> ()\n    zb = Sub (z, k)", c="", conv="Conv (x, w, c0)",
        w="float[4,3,1,1] w, float[4] c0"), "Conv", 0),
    # ConvTranspose: weight (in, out/groups, k, k), two groups, 6 output channels
    "conv_transpose_grouped_add": (conv_add(
        "zb = Add (z, c)", c="float[1,6,1,1] c", conv="ConvTranspose <group = 2, strides = [2,2]> (x, w)",
        w="float[4,3,2,2] w", x="float[N,4,3,3] x", out="float[N,6,6,6] y", stats=STATS6), "ConvTranspose", 0),
    "conv_transpose_grouped_own_bias_add": (conv_add(
        "zb = Add (c, z)", c="float[6,1,1] c", conv="ConvTranspose <group = 2> (x, w, c0)",
        w="float[4,3,3,3] w, float[6] c0", x="float[N,4,3,3] x", out="float[N,6,5,5] y", stats=STATS6),
        "ConvTranspose", 0),
    # Gemm (rank 2: the channel axis is the last, so (C,) and (1,C) are per-channel); with C and beta, the Add's
    # constant is added to beta * C; value_floats is a (C,) constant
    "gemm_add_vector": (conv_add("zb = Add (z, c)", c="float[4] c", conv="Gemm <transB = 1> (x, w)",
                                 w="float[4,3] w", x="float[N,3] x", out="float[N,4] y"), "Gemm", 0),
    "gemm_own_bias_beta_add_row": (conv_add(
        "zb = Add (c, z)", c="float[1,4] c", conv="Gemm <beta = 2.5, alpha = 0.5> (x, w, c0)",
        w="float[3,4] w, float[4] c0", x="float[N,3] x", out="float[N,4] y"), "Gemm", 0),
    "gemm_add_constant_node_value_floats": (conv_add(
        "k = Constant <value_floats = [0.5, -1.0, 0.25, 2.0]> ()\n    zb = Add (z, k)", c="",
        conv="Gemm <transB = 1> (x, w)", w="float[4,3] w", x="float[N,3] x", out="float[N,4] y"), "Gemm", 0),
    # MatMul has no bias input: its bias node stays, as an Add of a bias of its own (-c for a Sub)
    "matmul_sub": (conv_add("zb = Sub (z, c)", c="float[4] c", conv="MatMul (x, w)", w="float[3,4] w",
                            x="float[N,3] x", out="float[N,4] y"), "MatMul", 1),
}


@pytest.mark.parametrize("name", list(FOLDS))
def test_layer_bias_node_bn_folds(name):
    text, layer_op, adds_left = FOLDS[name]
    model = build(header() + text)
    before = model.SerializeToString()
    result = fold_graph(model)
    assert model.SerializeToString() == before, "fold_graph changed its input"
    assert len(result.folded) == 1 and not result.skipped, result.skipped
    assert op_count(result.model, BN) == 0 and op_count(result.model, layer_op) == 1
    assert op_count(result.model, "Add") + op_count(result.model, "Sub") == adds_left
    assert op_count(result.model, "Sub") == 0
    _check(model, result.model)  # onnx.checker full check, names kept, onnxruntime parity
    assert discover_graph(result.model).folds == []
    used = {n for node in result.model.graph.node for n in node.input}
    assert all(t.name in used for t in result.model.graph.initializer), "an unused initializer was kept"


def test_the_layer_writes_the_bias_nodes_output_and_the_bn_output_is_still_produced():
    """The BN's output feeds a Relu: the Conv, having taken the Add's place, writes the BN's output name."""
    text = conv_add("zb = Add (c, z)", out="float[N,4,5,5] r").replace(
        "y = BatchNormalization (zb, s, b, m, v)", "y = BatchNormalization (zb, s, b, m, v)\n    r = Relu (y)")
    model = build(header() + text)
    result = fold_graph(model)
    (conv,) = [n for n in result.model.graph.node if n.op_type == "Conv"]
    assert conv.output[0] == "y" and len(conv.input) == 3
    assert [n.op_type for n in result.model.graph.node] == ["Conv", "Relu"]
    _check(model, result.model)


def test_the_combined_bias_rounds_once_in_float16():
    """Own bias + constant is summed in float64 and folded from there: the stored bias is the float64 fold of
    ``b + c`` rounded once to float16, bit for bit."""
    text = header() + """g (float16[N,3,2,2] x, float16[64,3,1,1] w, float16[64] c0, float16[1,64,1,1] c, float16[64] s,
                       float16[64] b, float16[64] m, float16[64] v) => (float16[N,64,2,2] y) {
        z = Conv (x, w, c0)
        zb = Add (z, c)
        y = BatchNormalization (zb, s, b, m, v)
    }"""
    model = build(text)
    arrays = {t.name: torch.from_numpy(numpy_helper.to_array(t).astype(np.float64)) for t in model.graph.initializer}
    result = fold_graph(model)
    assert len(result.folded) == 1
    params = BNParams(arrays["m"], arrays["v"], 1e-5, arrays["s"], arrays["b"])
    _, want = fold_bn_after(arrays["w"].half(), arrays["c0"] + arrays["c"].reshape(-1), params)
    (conv,) = [n for n in result.model.graph.node if n.op_type == "Conv"]
    bias = next(t for t in result.model.graph.initializer if t.name == conv.input[2])
    assert bias.data_type == TensorProto.FLOAT16
    assert numpy_helper.to_array(bias).view(np.int16).tolist() == want.view(torch.int16).numpy().tolist()


def shared_bias(add: str, bn_input: str) -> str:
    """BN -> Conv1 (-> ``add``) -> BN, Conv1's own bias c0 also Conv2's."""
    return f"""g (float[N,3,5,5] x, float[3] s0, float[3] b0, float[3] m0, float[3] v0, float[4,3,1,1] w, float[4] c0,
                float[1,4,1,1] c, float[4,3,1,1] w2, {STATS4}) => (float[N,4,5,5] y, float[N,4,5,5] y2) {{
        x0 = BatchNormalization (x, s0, b0, m0, v0)
        z = Conv (x0, w, c0)
        {add}
        y = BatchNormalization ({bn_input}, s, b, m, v)
        y2 = Conv (x, w2, c0)
    }}"""


# name: (graph, the folds' positions, the nodes left)
TOPOLOGIES = {
    # BN -> unpadded Conv -> Add(c) -> BN: both fold into the Conv (the first fold makes c its bias)
    "bn_on_each_side": (f"""g (float[N,3,5,5] x, float[3] s0, float[3] b0, float[3] m0, float[3] v0,
                            float[4,3,1,1] w, float[1,4,1,1] c, {STATS4}) => (float[N,4,5,5] y) {{
        x0 = BatchNormalization (x, s0, b0, m0, v0)
        z = Conv (x0, w)
        zb = Add (z, c)
        y = BatchNormalization (zb, s, b, m, v)
    }}""", ["after", "before"], ["Conv"]),
    # the structural rule still holds: BN(Add(Conv1 + c1, Conv2 - c2)) scales both convs, one takes the shift
    "add_of_two_layers_with_bias_nodes": (f"""g (float[N,3,5,5] x, float[4,3,1,1] w1, float[1,4,1,1] c1,
                                              float[4,3,3,3] w2, float[4,1,1] c2, {STATS4}) => (float[N,4,5,5] y) {{
        z1 = Conv (x, w1)
        a1 = Add (z1, c1)
        z2 = Conv <pads = [1,1,1,1]> (x, w2)
        a2 = Sub (z2, c2)
        t = Add (a1, a2)
        y = BatchNormalization (t, s, b, m, v)
    }}""", ["add"], ["Conv", "Conv", "Add"]),
    # Conv1's own bias is Conv2's too: with a bias node, the first fold makes c0 + c a bias of Conv1's own;
    # without, the first fold copies c0 and the second finds the copy
    "shared_own_bias_with_bias_node": (shared_bias("zb = Add (z, c)", "zb"), ["after", "before"], ["Conv", "Conv"]),
    "shared_own_bias_without_bias_node": (shared_bias("", "z"), ["after", "before"], ["Conv", "Conv"]),
}


@pytest.mark.parametrize("name", list(TOPOLOGIES))
def test_topologies_around_a_bias_node(name):
    text, folds, left = TOPOLOGIES[name]
    model = build(header() + text)
    result = fold_graph(model)
    assert sorted(f.position for f in result.folded) == folds and not result.skipped, result.skipped
    assert [n.op_type for n in result.model.graph.node] == left
    _check(model, result.model)
    if "shared" in name:  # Conv2 keeps the original bias, Conv1 has one of its own
        assert result.model.graph.node[1].input[2] == "c0" != result.model.graph.node[0].input[2]


def test_a_bias_node_without_a_bn_becomes_the_layers_bias_as_an_affine_fold():
    """No BN follows: the Add still goes into the Conv (onnxruntime's Conv-Add fusion), reported as an affine fold."""
    model = build(header() + """g (float[N,3,5,5] x, float[4,3,1,1] w, float[1,4,1,1] c) => (float[N,4,5,5] y) {
        z = Conv (x, w)
        y = Add (z, c)
    }""")
    result = fold_graph(model)
    assert not result.folded and [(a.layer, a.nodes, a.ops) for a in result.affine] == [("Conv#0", ("Add#1",),
                                                                                           ("Add",))]
    assert [n.op_type for n in result.model.graph.node] == ["Conv"] and result.model.graph.node[0].output == ["y"]
    _check(model, result.model)


# -- must not fold: an Add/Sub of a constant after a layer that is no bias -----------------------------------------------
# name: (graph, build() keyword arguments, reason code, what the reason must say)
SKIPS = {
    # c - layer negates the layer: not a bias
    "constant_minus_layer": (conv_add("zb = Sub (c, z)"), {}, "not-a-layer",
                             "follows Sub#1, whose constant 'c' is its first operand: 'c' - Conv#0 negates"),
    # a constant that varies along the spatial axes, or along W alone: (C,) against NCHW is the W axis
    "constant_over_spatial_axes": (conv_add("zb = Add (z, c)", c="float[1,4,5,5] c"), {}, "broadcast", (
        "constant 'c' of shape (1, 4, 5, 5) does not vary along Conv#0's channel axis alone (axis 1 of its rank-4 "
        "output): it is not a per-channel bias, which has shape (1, 4, 1, 1)")),
    "constant_over_last_axis": (conv_add("zb = Add (z, c)", c="float[1,1,1,5] c"), {}, "broadcast",
                                "of shape (1, 1, 1, 5) does not vary along"),
    "vector_on_nchw_is_the_w_axis": (conv_add("zb = Add (z, c)", c="float[4] c", out="float[N,4,4,4] y",
                                              x="float[N,3,4,4] x"), {}, "broadcast", "of shape (4,) does not vary along"),
    # the layer's output is read elsewhere too: moving the constant into the layer would change what Relu sees
    "layer_output_read_elsewhere": (conv_add("zb = Add (z, c)", out="float[N,4,5,5] y, float[N,4,5,5] r").replace(
        "\n}", "\n    r = Relu (z)\n}"), {}, "shared-output",
        "follows Add#1, whose operand Conv#0 also feeds Relu#3: its constant 'c' cannot become Conv#0's bias"),
    # fed at run time (a per-channel graph input), or an initializer a caller can override (IR < 4 style)
    "constant_is_a_graph_input": (conv_add("zb = Add (z, c)"), {"constants": ("w", "s", "b", "m", "v")},
                                  "not-constant", "follows Add#1, whose bias 'c' is a graph input (fed at run time)"),
    "constant_is_an_initializer_listed_as_input": (conv_add("zb = Add (c, z)"), {"listed": ("c",)}, "not-constant",
                                                   "bias 'c' is an initializer also listed as a graph input"),
}


@pytest.mark.parametrize("name", list(SKIPS))
def test_must_not_fold(name):
    text, kwargs, code, reason = SKIPS[name]
    model = build(header() + text, **kwargs)
    result = fold_graph(model)
    assert result.folded == []
    (skip,) = result.skipped
    assert (skip.code, skip.bn) == (code, "BatchNormalization#2"), skip
    assert reason in skip.reason, skip.reason
    assert op_count(result.model, BN) == 1
    assert result.model.graph.node == model.graph.node
    onnx.checker.check_model(result.model, full_check=True)
    assert discover_graph(model).skips == result.skipped


def test_a_graph_input_the_size_of_the_data_is_an_operand_not_a_bias():
    """``Add(conv(x), r)`` with ``r`` a full-size graph input is a residual sum, not a would-be bias: the reason is
    the structural rule's, as before."""
    model = build(header() + conv_add("zb = Add (z, r)", c="float[N,4,5,5] r"), constants=("w", "s", "b", "m", "v"))
    (skip,) = fold_graph(model).skipped
    assert skip.code == "not-a-layer" and "its operand r is not a layer" in skip.reason, skip.reason
