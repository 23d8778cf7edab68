"""Issue 15, item 3: affine tails. A BN that a producer already wrote out (FrozenBatchNorm2d's ``Mul``/``Add``,
tf2onnx's NHWC ``Mul``/``Add`` behind a ``Transpose``, a hand-written ``(x - mean) / sqrt(var + eps) * gamma + beta``),
a layer scale or a bias ``Add``: after a Conv, ConvTranspose, Gemm or MatMul these are one affine map per channel,
and fold into the layer (as onnxruntime's Conv-Mul and Conv-Add fusions do). They are reported apart from BN folds
(``result.affine``), with their nodes.

Each positive case is checked against the unfolded graph in onnxruntime (optimisations off) after onnx.checker's full
check (``tests.onnx_graphs._check``), and by which nodes are left. Each negative case keeps its nodes as they were.
"""

from __future__ import annotations

import numpy as np
import onnx.parser
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import numpy_helper

import bnfold
from bnfold.onnx.fold import fold_graph
from tests.onnx_graphs import _check, build, header, op_count

CONV = "float[N,3,5,5] x, float[4,3,3,3] w"
OUT = "float[N,4,5,5] y"


def conv_graph(body: str, params: str = "", conv: str = "z = Conv <pads = [1,1,1,1]> (x, w)", inputs: str = CONV,
               out: str = OUT) -> onnx.ModelProto:
    """``x -> conv -> z``, then ``body`` (which writes ``y``); ``params`` more graph inputs made initializers."""
    signature = ", ".join(p for p in (inputs, params) if p)
    return build(header() + f"g ({signature}) => ({out}) {{\n    {conv}\n    {body}\n}}")


# name: (model, the op types left, (layer, ops) of each affine fold)
FOLDS = {
    # FrozenBatchNorm2d exported with constant folding: a bias-less conv, Mul (1,C,1,1), Add (1,C,1,1)
    "frozen_bn": (conv_graph("m = Mul (z, s)\n    y = Add (m, t)", "float[1,4,1,1] s, float[1,4,1,1] t"),
                  ["Conv"], [("Conv#0", ("Mul", "Add"))]),
    "either_operand_order": (conv_graph("m = Mul (s, z)\n    y = Add (t, m)", "float[4,1,1] s, float[1,4,1,1] t"),
                             ["Conv"], [("Conv#0", ("Mul", "Add"))]),
    "own_bias_and_sub": (conv_graph("m = Mul (z, s)\n    y = Sub (m, t)", "float[4] b0, float[1,4,1,1] s, "
                                    "float[1,4,1,1] t", conv="z = Conv <pads = [1,1,1,1]> (x, w, b0)"),
                         ["Conv"], [("Conv#0", ("Mul", "Sub"))]),
    # a hand-written BN: (z - mean) / sqrt(var + eps) * gamma + beta, the denominator computed in the graph
    "sub_div_mul_add_computed_denominator": (conv_graph(
        "e = Constant <value = float {0.00001}> ()\n    ve = Add (v, e)\n    d = Sqrt (ve)\n    c = Sub (z, m)\n"
        "    n = Div (c, d)\n    g2 = Mul (n, s)\n    y = Add (g2, t)",
        "float[1,4,1,1] m, float[1,4,1,1] v, float[1,4,1,1] s, float[1,4,1,1] t"),
        ["Conv"], [("Conv#0", ("Sub", "Div", "Mul", "Add"))]),
    "scalar_scale": (conv_graph("m = Mul (z, s)\n    y = Add (m, t)", "float s, float[1,4,1,1] t"),
                     ["Conv"], [("Conv#0", ("Mul", "Add"))]),
    "layer_scale_alone": (conv_graph("y = Mul (z, s)", "float[1,4,1,1] s"), ["Conv"], [("Conv#0", ("Mul",))]),
    "conv_transpose_groups": (conv_graph(
        "m = Mul (z, s)\n    y = Add (m, t)", "float[1,4,1,1] s, float[1,4,1,1] t",
        conv="z = ConvTranspose <group = 2, strides = [2, 2]> (x, w)", inputs="float[N,4,3,3] x, float[4,2,2,2] w",
        out="float[N,4,6,6] y"), ["ConvTranspose"], [("ConvTranspose#0", ("Mul", "Add"))]),
    # Gemm: alpha and beta go into the tensors, which the fold rounds once
    "gemm_alpha_beta": (conv_graph(
        "m = Mul (z, s)\n    y = Add (m, t)", "float s, float[4] t, float[4] c0",
        conv="z = Gemm <alpha = 0.5, beta = 2.0, transB = 1> (x, w, c0)", inputs="float[N,3] x, float[4,3] w",
        out="float[N,4] y"), ["Gemm"], [("Gemm#0", ("Mul", "Add"))]),
    # MatMul of rank 3: the features are the last axis; the shift stays as the MatMul's own bias Add
    "matmul_rank3": (conv_graph(
        "m = Mul (z, s)\n    y = Add (m, t)", "float[4] s, float[4] t", conv="z = MatMul (x, w)",
        inputs="float[N,2,3] x, float[3,4] w", out="float[N,2,4] y"), ["MatMul", "Add"], [("MatMul#0", ("Mul", "Add"))]),
    "matmul_scale_alone": (conv_graph("y = Div (z, s)", "float[4] s", conv="z = MatMul (x, w)",
                                      inputs="float[N,3] x, float[3,4] w", out="float[N,4] y"),
                           ["MatMul"], [("MatMul#0", ("Div",))]),
    # tf2onnx's NHWC graph: the Keras BN as Mul/Add by (C,) constants on the last axis, behind the conv's Transpose
    "tf2onnx_nhwc": (conv_graph(
        "p = Transpose <perm = [0,2,3,1]> (z)\n    m = Mul (p, s)\n    a = Add (m, t)\n    y = Relu (a)",
        "float[4] s, float[4] t", out="float[N,5,5,4] y"), ["Conv", "Transpose", "Relu"], [("Conv#0", ("Mul", "Add"))]),
    # a BN after the tail: the tail goes into the conv, then the BN
    "tail_then_bn": (conv_graph("m = Mul (z, s)\n    a = Add (m, t)\n    y = BatchNormalization (a, s2, b2, m2, v2)",
                                "float[1,4,1,1] s, float[1,4,1,1] t, float[4] s2, float[4] b2, float[4] m2, "
                                "float[4] v2"), ["Conv"], [("Conv#0", ("Mul", "Add"))]),
    # the tail's output is the graph output and also read by another node: the conv writes it
    "tail_output_read_twice": (conv_graph("m = Mul (z, s)\n    y = Add (m, t)\n    r = Relu (y)",
                                          "float[1,4,1,1] s, float[1,4,1,1] t"), ["Conv", "Relu"],
                               [("Conv#0", ("Mul", "Add"))]),
}


@pytest.mark.parametrize("name", list(FOLDS))
def test_affine_tail_folds_into_its_layer(name):
    model, left, affine = FOLDS[name]
    before = model.SerializeToString()
    result = fold_graph(model)
    assert model.SerializeToString() == before, "fold_graph changed its input"
    assert [n.op_type for n in result.model.graph.node] == left
    assert [(a.layer, a.ops) for a in result.affine] == affine
    assert not result.skipped, result.skipped
    assert len(result.folded) == op_count(model, "BatchNormalization")
    _check(model, result.model)
    used = {n for node in result.model.graph.node for n in node.input}
    assert all(t.name in used for t in result.model.graph.initializer), "an unused initializer was kept"


def test_gemm_alpha_and_beta_are_one_once_folded():
    result = fold_graph(FOLDS["gemm_alpha_beta"][0])
    gemm = result.model.graph.node[0]
    assert {a.name: a.f for a in gemm.attribute if a.name in ("alpha", "beta")} in ({}, {"alpha": 1.0, "beta": 1.0})


def test_affine_fold_names_its_nodes_and_says_what_it_did():
    (fold,) = fold_graph(FOLDS["frozen_bn"][0]).affine
    assert fold.nodes == ("Mul#1", "Add#2") and fold.name == "Mul#1 -> Add#2"
    assert fold.describe() == "Mul -> Add folded into Conv#0"
    assert fold.to_dict() == {"layer": "Conv#0", "nodes": ["Mul#1", "Add#2"], "ops": ["Mul", "Add"]}


def test_constants_as_constant_nodes_and_float16():
    """paddle2onnx writes constants as Constant nodes (value, value_float, value_floats); a float16 graph folds in
    float16, rounded once."""
    model = build(header() + """g (float16[N,3,5,5] x, float16[4,3,1,1] w, float16[1,4,1,1] s, float16[1,4,1,1] t)
                                => (float16[N,4,5,5] y) {
        z = Conv (x, w)
        m = Mul (z, s)
        y = Add (m, t)
    }""")
    result = fold_graph(model)
    assert [n.op_type for n in result.model.graph.node] == ["Conv"] and len(result.affine) == 1
    _check(model, result.model, atol=2e-3, rtol=2e-3)
    floats = build(header() + """g (float[N,3] x, float[4,3] w) => (float[N,4] y) {
        z = Gemm <transB = 1> (x, w)
        s = Constant <value_float = 0.75> ()
        t = Constant <value_floats = [0.1, 0.2, -0.3, 0.4]> ()
        m = Mul (z, s)
        y = Add (m, t)
    }""")
    result = fold_graph(floats)
    assert [n.op_type for n in result.model.graph.node] == ["Gemm"]
    _check(floats, result.model)


def test_a_shared_weight_is_copied_for_the_layer_with_the_tail():
    model = build(header() + """g (float[N,3,5,5] x, float[4,3,1,1] w, float[1,4,1,1] s) => (float[N,4,5,5] y,
                                                                                        float[N,4,5,5] y2) {
        z = Conv (x, w)
        y = Mul (z, s)
        y2 = Conv (x, w)
    }""")
    result = fold_graph(model)
    assert [n.op_type for n in result.model.graph.node] == ["Conv", "Conv"]
    convs = result.model.graph.node
    assert convs[0].input[1] != "w" and convs[1].input[1] == "w"
    assert any("read by other nodes too" in n for n in result.notes), result.notes
    _check(model, result.model)


# name: (model, what the note must say, or None for no note)
KEPT = {
    "full_tensor_scale": (conv_graph("m = Mul (z, s)\n    y = Add (m, t)", "float[1,4,5,5] s, float[1,4,1,1] t"),
                          None),
    "vector_on_nchw_is_the_w_axis": (conv_graph("m = Mul (z, s)\n    y = Add (m, t)", "float[5] s, float[5] t"), None),
    "constant_divided_by_the_layer": (conv_graph("y = Div (s, z)", "float[1,4,1,1] s"), None),
    "constant_minus_the_layer": (conv_graph("y = Sub (t, z)", "float[1,4,1,1] t"), None),
    "layer_output_read_elsewhere": (conv_graph("m = Mul (z, s)\n    r = Relu (z)\n    y = Add (m, r)",
                                               "float[1,4,1,1] s"), None),
    "scale_is_a_graph_input": (build(header() + f"""g ({CONV}, float[1,4,1,1] s) => ({OUT}) {{
        z = Conv <pads = [1,1,1,1]> (x, w)
        y = Mul (z, s)
    }}""", constants=("w",)), None),
    "divides_by_zero": (build(header() + f"""g ({CONV}) => ({OUT}) {{
        z = Conv <pads = [1,1,1,1]> (x, w)
        s = Constant <value = float[1,4,1,1] {{1.0, 0.0, 2.0, 4.0}}> ()
        y = Div (z, s)
    }}"""), "not finite (or divides by zero)"),
    # no Transpose after a MatMul: its bias must stay next to it
    "matmul_then_transpose": (conv_graph("p = Transpose <perm = [1,0]> (z)\n    y = Mul (p, s)", "float[4,1] s",
                                         conv="z = MatMul (x, w)", inputs="float[2,3] x, float[3,4] w",
                                         out="float[4,2] y"), None),
}


@pytest.mark.parametrize("name", list(KEPT))
def test_what_is_not_a_per_channel_affine_tail_is_kept(name):
    model, note = KEPT[name]
    result = fold_graph(model)
    assert result.affine == []
    assert [n.op_type for n in result.model.graph.node] == [n.op_type for n in model.graph.node if
                                                            n.op_type != "Constant" or note]
    if note:  # the graph divides by zero: its outputs are not finite, so only its validity is checked
        assert any(note in n for n in result.notes), result.notes
        onnx.checker.check_model(result.model, full_check=True)
    else:
        _check(model, result.model)


@pytest.mark.parametrize("scaled", ["a", "b"], ids=["on-the-target-conv", "on-the-other-conv"])
def test_a_layer_scale_inside_a_branch_merge_is_left_to_the_merge(scaled):
    """RepVGG-style sum with a scaled branch: the Mul is a factor of the merge, not a tail to fold first, whether it
    scales the conv the others merge into (the 3x3) or another one."""
    a, b = ("m = Mul (a0, s)", "b = Conv (x, w1)") if scaled == "a" else ("a = Conv <pads = [1,1,1,1]> (x, w)",
                                                                          "m = Mul (b0, s)")
    first = "a0 = Conv <pads = [1,1,1,1]> (x, w)" if scaled == "a" else a
    second = b if scaled == "a" else "b0 = Conv (x, w1)"
    mul, total = (a, "y = Add (m, b)") if scaled == "a" else (b, "y = Add (a, m)")
    model = build(header() + f"""g (float[N,4,5,5] x, float[4,4,3,3] w, float[4,4,1,1] w1, float[1,4,1,1] s)
                                => (float[N,4,5,5] y) {{
        {first}
        {second}
        {mul}
        {total}
    }}""")
    result = fold_graph(model)
    assert [n.op_type for n in result.model.graph.node] == ["Conv"] and result.affine == []
    _check(model, result.model)


# -- any chain of per-channel ops, in any order, operands either way round: one affine map ---------------------------
_OPS = st.sampled_from(["Mul", "Div", "Add", "Sub"])
_SHAPES = st.sampled_from(["float[1,4,1,1]", "float[4,1,1]", "float", "float[1]"])


@settings(max_examples=30, deadline=None)
@given(steps=st.lists(st.tuples(_OPS, _SHAPES, st.booleans()), min_size=1, max_size=5),
       bias=st.booleans(), seed=st.integers(0, 2**16))
def test_any_chain_of_per_channel_ops_folds_exactly(steps, bias, seed):
    lines, params, data = [], [], "z"
    for i, (op, shape, constant_first) in enumerate(steps):
        operands = (f"c{i}", data) if constant_first and op in ("Mul", "Add") else (data, f"c{i}")
        lines.append(f"t{i} = {op} ({operands[0]}, {operands[1]})")
        params.append(f"{shape} c{i}")
        data = f"t{i}"
    lines.append(f"y = Identity ({data})")
    conv = "z = Conv <pads = [1,1,1,1]> (x, w" + (", b0)" if bias else ")")
    model = conv_graph("\n    ".join(lines), ", ".join(params + (["float[4] b0"] if bias else [])), conv=conv)
    for tensor in model.graph.initializer:  # divisors away from zero, as a trained model's are
        if tensor.name.startswith("c"):
            value = numpy_helper.to_array(tensor)
            tensor.CopyFrom(numpy_helper.from_array(np.where(np.abs(value) < 0.25, 0.5, value).astype(np.float32),
                                                    tensor.name))
    result = fold_graph(model)
    assert [n.op_type for n in result.model.graph.node] == ["Conv", "Identity"]
    assert [a.ops for a in result.affine] == [tuple(op for op, _, _ in steps)]
    _check(model, result.model)


def test_fuse_reports_affine_folds_in_the_table_summary_and_json():
    result = bnfold.fuse(FOLDS["tail_then_bn"][0])
    assert result and len(result.folded) == 1 and len(result.affine) == 1
    data = result.to_dict()
    assert data["affine"] == [{"layer": "Conv#0", "nodes": ["Mul#1", "Add#2"], "ops": ["Mul", "Add"]}]


def test_value_info_of_the_tail_is_dropped():
    """The tail's last output has value_info (as shape inference writes it): it stays valid once the conv writes it."""
    model = FOLDS["frozen_bn"][0]
    inferred = onnx.shape_inference.infer_shapes(model)
    assert any(v.name == "m" for v in inferred.graph.value_info)
    result = fold_graph(inferred)
    assert [v.name for v in result.model.graph.value_info if v.name == "m"] == []
    _check(inferred, result.model)


def test_inspect_says_which_affine_tails_would_fold():
    report = bnfold.inspect(FOLDS["frozen_bn"][0])
    assert "affine tail Mul#1 -> Add#2 (Mul -> Add) after Conv#0: folds into Conv#0" in report.notes


def test_a_constant_of_another_float_type_is_not_folded():
    """A double constant after a float Gemm is an ill-typed graph: bnfold does not make it a valid one."""
    model = onnx.parser.parse_model(header() + """g (float[N,3] x) => (float[N,4] y) {
        w = Constant <value = float[4,3] {1,2,3,4,5,6,7,8,9,10,11,12}> ()
        s = Constant <value = double[4] {0.5, 1.5, 2.0, 0.25}> ()
        z = Gemm <transB = 1> (x, w)
        y = Mul (z, s)
    }""")
    result = fold_graph(model)
    assert result.affine == [] and [n.op_type for n in result.model.graph.node].count("Mul") == 1
