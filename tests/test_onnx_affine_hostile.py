"""Hostile inputs for the affine-tail folds of :func:`bnfold.onnx.fold.fold_graph` (issue 15, item 3).

The first three guard bugs this pass found (each docstring says what went wrong): a refused tail leaving a copy of
a shared weight, a RecursionError on a long chain, labels that moved once computed constants were evaluated. The
rest are regression tests for attacks that the fold handles correctly: transposes that move the channel axis, grouped and transposed
convs, Gemm's odd C shapes, MatMul of rank 1 and 4, BNs on both sides, subgraphs, value_info, IR 3, dtypes the tail
cannot take, and a clean refusal. Every graph is built from seeded values (:func:`tests.onnx_graphs.build`) and
checked in onnxruntime with optimisations off after onnx.checker's full check (:func:`tests.onnx_graphs._check`).
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import bnfold
from bnfold.onnx.fold import fold_graph
from bnfold.onnx.graph import node_labels
from tests.onnx_graphs import _check, build, feeds, header, run

H = header()


def graph(signature: str, body: str, outputs: str, h: str = H, **kwargs) -> onnx.ModelProto:
    """``g (signature) => (outputs) { body }``, every input but the first a seeded initializer."""
    return build(h + f"g ({signature}) => ({outputs}) {{\n    {body}\n}}", **kwargs)


def _set(model: onnx.ModelProto, name: str, values) -> None:
    tensor = next(t for t in model.graph.initializer if t.name == name)
    dtype = numpy_helper.to_array(tensor).dtype
    tensor.CopyFrom(numpy_helper.from_array(np.asarray(values, dtype=dtype).reshape(tuple(tensor.dims)), name))


# -- bugs found by the adversarial pass, fixed -------------------------------------------------------------------------------------
def test_a_refused_tail_leaves_a_shared_weight_as_it_was():
    """A tail the tensors refuse (here a Div by a constant holding 0) must leave the graph as it was. It used to
    copy the weight that Conv#0 shares with Conv#3 first (``OnnxHost._claim`` calls ``_own`` before
    ``_absorb_tail`` checks anything): Conv#0 is left reading a duplicate ``w_Conv#0`` (the model carries the
    weight twice) and the notes say the weight was "folded into a copy" although nothing was folded."""
    model = graph("float[N,3,5,5] x, float[4,3,1,1] w", """z = Conv (x, w)
    s = Constant <value = float[1,4,1,1] {1.0, 0.0, 2.0, 4.0}> ()
    y = Div (z, s)
    y2 = Conv (x, w)""", "float[N,4,5,5] y, float[N,4,5,5] y2")
    result = fold_graph(model)
    assert result.affine == []
    assert any("divides by zero" in n for n in result.notes), result.notes
    onnx.checker.check_model(result.model, full_check=True)
    assert [t.name for t in result.model.graph.initializer] == ["w"], "a copy of the weight was left behind"
    assert result.model.graph.node[0].input[1] == "w"
    assert not any("folded into a copy" in n for n in result.notes), result.notes


def _long_tail(pairs: int) -> onnx.ModelProto:
    nodes = [helper.make_node("Gemm", ["x", "w"], ["z0"], transB=1)]
    inits = [numpy_helper.from_array(np.random.default_rng(0).normal(size=(4, 3)).astype(np.float32), "w")]
    for i in range(2 * pairs):
        op, value = ("Mul", 1.0) if i % 2 == 0 else ("Add", 1e-3)
        inits.append(numpy_helper.from_array(np.full((4,), value, np.float32), f"c{i}"))
        nodes.append(helper.make_node(op, [f"z{i}", f"c{i}"], [f"z{i + 1}"]))
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
                          [helper.make_tensor_value_info(f"z{2 * pairs}", TensorProto.FLOAT, [2, 4])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_a_long_tail_of_alternating_mul_and_add_folds_without_recursion_error():
    """A Gemm followed by 600 ``Mul``/``Add`` pairs (valid ONNX, one affine map) should fold into the Gemm. It used to
    raise RecursionError: the tail's Adds after the first Mul are not carried, so they reach the
    shared pairing rules as sum nodes, and ``bnfold.discover.rules._tree`` (its nested ``walk``, called from
    ``find_merges``) recursed once per Add/Mul of the chain. (The same crash happened without any layer, for a long
    enough chain of Adds by constants: the recursion was in the shared rules; it is a loop now.)"""
    model = _long_tail(600)
    result = fold_graph(model)
    assert [n.op_type for n in result.model.graph.node] == ["Gemm"]
    _check(model, result.model)


def test_affine_fold_labels_are_those_of_the_users_graph_when_a_constant_is_computed():
    """``result.affine`` must name nodes by the labels of the graph the user passed (as the note about the computed
    denominator does: ``Div#4``). It used to name them by their positions *after* ``fold_computed_constants`` took
    the Add/Sqrt nodes out (``_plan`` evaluates in place, then ``translate``/``OnnxHost`` label the edited graph):
    the fold was reported as ``Div#1 -> Mul#2`` into ``Conv#0``, which in the user's graph are the Add, the Sqrt
    and the Constant. (BN folds after a computed constant are labelled the same way.)"""
    model = graph("float[N,3,5,5] x, float[4,3,3,3] w, float[1,4,1,1] v, float[1,4,1,1] s", """e = Constant <value = float {0.001}> ()
    ve = Add (v, e)
    d = Sqrt (ve)
    z = Conv <pads = [1,1,1,1]> (x, w)
    n = Div (z, d)
    y = Mul (n, s)""", "float[N,4,5,5] y")
    assert node_labels(model.graph.node) == ["Constant#0", "Add#1", "Sqrt#2", "Conv#3", "Div#4", "Mul#5"]
    result = fold_graph(model)
    assert any(n.startswith("Div#4: its input 'd' computed from constants") for n in result.notes), result.notes
    assert [(a.layer, a.nodes) for a in result.affine] == [("Conv#3", ("Div#4", "Mul#5"))]
    _check(model, result.model)


# -- attacks that fold correctly: regression tests ----------------------------------------------------------------
C = "float[N,3,5,5] x, float[4,3,3,3] w"
CONV = "z = Conv <pads = [1,1,1,1]> (x, w)"
BN = "float[4] bs, float[4] bb, float[4] bm, float[4] vb"

# name: (model, op types left, the ops of each affine fold, BN folds)
FOLDS = {
    # tf2onnx-like: Mul in NCHW, Transpose to NHWC, Add there, back to NCHW, Mul again: one map, both Transposes kept
    "mul_transpose_add_transpose_mul": (graph(C + ", float[1,4,1,1] s, float[4] t, float[4,1,1] u", CONV + """
    m = Mul (z, s)
    p = Transpose <perm = [0,2,3,1]> (m)
    a = Add (p, t)
    q = Transpose <perm = [0,3,1,2]> (a)
    y = Mul (q, u)""", "float[N,4,5,5] y"), ["Conv", "Transpose", "Transpose"], [("Mul", "Add", "Mul")], 0),
    # a Transpose without perm reverses the axes: the channels end on axis 2, a (4,1) constant scales them
    "transpose_without_perm": (graph(C + ", float[4,1] s", CONV + """
    p = Transpose (z)
    y = Mul (p, s)""", "float[5,5,4,N] y"), ["Conv", "Transpose"], [("Mul",)], 0),
    # ConvTranspose, 3 groups, its own bias: output channels are weight dim 1 times the groups
    "conv_transpose_three_groups": (graph("float[N,6,3,3] x, float[6,2,2,2] w, float[6] b, float[1,6,1,1] s, "
                                          "float[6,1,1] t", """z = ConvTranspose <group = 3, strides = [2,2]> (x, w, b)
    m = Mul (z, s)
    y = Add (m, t)""", "float[N,6,6,6] y"), ["ConvTranspose"], [("Mul", "Add")], 0),
    # Gemm with transA=1 (rows of its input are not features, but its output columns still are), C of shape (M, 1)
    "gemm_transa_and_column_c": (graph("float[3,2] x, float[3,4] w, float[2,1] c, float[4] s, float[1,4] t", """
    z = Gemm <transA = 1, alpha = 0.5, beta = 2.0> (x, w, c)
    m = Mul (z, s)
    y = Sub (m, t)""", "float[2,4] y"), ["Gemm"], [("Mul", "Sub")], 0),
    # MatMul of a vector (rank 1) and of rank 4: the shift stays as its bias Add
    "matmul_rank1": (graph("float[3] x, float[3,4] w, float[4] s, float[4] t", """z = MatMul (x, w)
    m = Mul (z, s)
    y = Add (m, t)""", "float[4] y"), ["MatMul", "Add"], [("Mul", "Add")], 0),
    "matmul_rank4": (graph("float[N,2,2,3] x, float[3,4] w, float[1,1,1,4] s, float[4] t", """z = MatMul (x, w)
    m = Div (z, s)
    y = Sub (m, t)""", "float[N,2,2,4] y"), ["MatMul", "Add"], [("Div", "Sub")], 0),
    # one weight, two convs, each with its own tail: each folds into its own copy
    "shared_weight_two_tails": (graph(C + ", float[1,4,1,1] s, float[1,4,1,1] t", CONV + """
    y = Mul (z, s)
    z2 = Conv <pads = [1,1,1,1]> (x, w)
    y2 = Add (z2, t)""", "float[N,4,5,5] y, float[N,4,5,5] y2"), ["Conv", "Conv"], [("Mul",), ("Add",)], 0),
    # a BN before the (unpadded) conv, the tail, then a BN after the tail: all three into the conv
    "bn_before_tail_bn_after": (graph("float[N,4,5,5] x, " + BN + ", float[4,4,1,1] w, float[1,4,1,1] s, "
                                      "float[4,1,1] t, float[4] cs, float[4] cb, float[4] cm, float[4] vc", """
    a = BatchNormalization (x, bs, bb, bm, vb)
    z = Conv (a, w)
    m = Mul (z, s)
    q = Add (m, t)
    y = BatchNormalization (q, cs, cb, cm, vc)""", "float[N,4,5,5] y"), ["Conv"], [("Mul", "Add")], 2),
    # two bias tails into a Concat, then a BN: the Concat fold sees each tail as its conv
    "concat_of_bias_tails_then_bn": (graph("float[N,3,5,5] x, float[2,3,1,1] w1, float[2,3,1,1] w2, "
                                           "float[1,2,1,1] t1, float[1,2,1,1] t2, " + BN, """z1 = Conv (x, w1)
    a1 = Add (z1, t1)
    z2 = Conv (x, w2)
    a2 = Sub (z2, t2)
    c = Concat <axis = 1> (a1, a2)
    y = BatchNormalization (c, bs, bb, bm, vb)""", "float[N,4,5,5] y"), ["Conv", "Conv", "Concat"], [("Add",), ("Sub",)], 1),
    # the tail's intermediate is a graph output: the tail stops before it is needed
    "intermediate_is_a_graph_output": (graph(C + ", float[1,4,1,1] s, float[1,4,1,1] t", CONV + """
    m = Mul (z, s)
    y = Add (m, t)""", "float[N,4,5,5] y, float[N,4,5,5] m"), ["Conv", "Add"], [("Mul",)], 0),
}


@pytest.mark.parametrize("name", list(FOLDS))
def test_hostile_tails_fold_exactly(name):
    model, left, ops, bns = FOLDS[name]
    model = onnx.shape_inference.infer_shapes(model)  # value_info for every intermediate name
    before = model.SerializeToString()
    result = fold_graph(model)
    assert model.SerializeToString() == before, "fold_graph changed its input"
    assert [n.op_type for n in result.model.graph.node] == left
    assert [a.ops for a in result.affine] == ops
    assert len(result.folded) == bns and not result.skipped, result.skipped
    _check(model, result.model)


def test_an_if_branch_reading_the_tail_keeps_what_it_reads():
    """A subgraph reads the tail's intermediate (``m``) and its last output (``a``): the Mul folds, the Add stays,
    and both branches compute what they did."""
    model = build(H + """g (float[N,3,5,5] x, bool cond, float[4,3,3,3] w, float[1,4,1,1] s, float[1,4,1,1] t)
                         => (float[N,4,5,5] y) {
        z = Conv <pads = [1,1,1,1]> (x, w)
        m = Mul (z, s)
        a = Add (m, t)
        y = If (cond) <then_branch = th () => (float[N,4,5,5] o) { o = Identity (m) },
                       else_branch = el () => (float[N,4,5,5] o) { o = Relu (a) }>
    }""", constants=("w", "s", "t"))
    result = fold_graph(model)
    assert [n.op_type for n in result.model.graph.node] == ["Conv", "Add", "If"]
    onnx.checker.check_model(result.model, full_check=True)
    x = np.random.default_rng(1).normal(size=(2, 3, 5, 5)).astype(np.float32)
    for cond in (True, False):
        inputs = {"x": x, "cond": np.array(cond)}
        np.testing.assert_allclose(run(result.model, inputs)[0], run(model, inputs)[0], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("elem", ["int64", "bool"])
def test_a_constant_of_another_element_type_is_not_folded(elem):
    """``Mul`` by an int64 or bool constant is no per-channel scale of a float layer: nothing is folded, nothing
    raises (the model is ill-typed; bnfold must not turn it into something else)."""
    model = onnx.parser.parse_model(H + f"""g (float[N,3] x) => (float[N,4] y) {{
        w = Constant <value = float[4,3] {{1,2,3,4,5,6,7,8,9,10,11,12}}> ()
        s = Constant <value = {elem}[4] {{1,0,1,1}}> ()
        z = Gemm <transB = 1> (x, w)
        y = Mul (z, s)
    }}""")
    result = fold_graph(model)
    assert result.affine == [] and [n.op_type for n in result.model.graph.node][-1] == "Mul"


def test_ir3_listed_constants_fold_and_float16_overflow_is_refused():
    """IR 3 lists every initializer as a graph input: read as constants, the tail folds (written as IR 4). A
    float16 tail whose folded weight overflows is refused with a note, and the graph stays as it was."""
    ir3 = graph("float[N,3,5,5] x, float[4,3,3,3] w, float[1,4,1,1] s, float[4,1,1] t", CONV + """
    m = Mul (z, s)
    y = Add (m, t)""", "float[N,4,5,5] y", h='<ir_version: 3, opset_import: ["" : 9]>\n', listed=("w", "s", "t"))
    result = fold_graph(ir3)
    assert [n.op_type for n in result.model.graph.node] == ["Conv"] and result.model.ir_version == 4
    inputs = feeds(ir3)
    np.testing.assert_allclose(run(result.model, inputs)[0], run(ir3, inputs)[0], atol=1e-5, rtol=1e-4)

    half = graph("float16[N,3,5,5] x, float16[4,3,1,1] w, float16[1,4,1,1] s", """z = Conv (x, w)
    y = Mul (z, s)""", "float16[N,4,5,5] y")
    _set(half, "w", np.full((4, 3, 1, 1), 2.0))
    _set(half, "s", [1.0, 6e4, 1.0, 1.0])
    result = fold_graph(half)
    assert result.affine == [] and [n.op_type for n in result.model.graph.node] == ["Conv", "Mul"]
    assert any("overflow" in n for n in result.notes), result.notes
    onnx.checker.check_model(result.model, full_check=True)


def test_fuse_proves_an_nhwc_tail_and_leaves_its_input_alone():
    model = FOLDS["mul_transpose_add_transpose_mul"][0]
    before = model.SerializeToString()
    result = bnfold.fuse(model)
    assert result and len(result.affine) == 1
    assert model.SerializeToString() == before


@pytest.mark.parametrize("body", [
    "z = Gemm <beta = 2.0, transB = 1> (x, w, c)\n    y = Add (z, c)",  # the tail's constant is the Gemm's C
    "z = Gemm <beta = 2.0, transB = 1> (x, w, c)\n    y = Mul (z, s)\n    y2 = Gemm <beta = 0.5, transB = 1> (x, w, c)",
], ids=["constant-is-c", "c-shared-with-another-beta"])
def test_a_gemm_c_read_in_several_layouts_still_folds(body):
    """Each tensor is read as the folding Gemm reads it (its beta), whatever other readers make of it."""
    outputs = "float[N,4] y" + (", float[N,4] y2" if "y2" in body else "")
    model = graph("float[N,3] x, float[4,3] w, float[4] c, float[4] s", body, outputs)
    result = fold_graph(model)
    assert len(result.affine) == 1 and "Mul" not in [n.op_type for n in result.model.graph.node]
    _check(model, result.model)
