"""Issue 9, ONNX side: branch merging (Add chains and Sum into one Conv), per-slice folds through Concat and folds
through Add, on graphs written with ONNX text (``tests/onnx_graphs.py``) and on small modules exported with the
TorchScript exporter.

Every folded graph is checked against the unfolded graph in onnxruntime with graph optimisations off (nothing of
its own hides a wrong fold), on seeded random inputs, relative to each output's scale; it keeps the graph's input
and output names and passes ``onnx.checker``'s full check; the model handed in is never modified.
"""

from __future__ import annotations

import copy
import io
import warnings
from collections import Counter
from collections.abc import Iterable

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, numpy_helper
from torch import nn

import bnfold
from models import zoo
from tests.onnx_graphs import build, feeds, op_count, run

HEADER = '<ir_version: 8, opset_import: ["" : 17]>\n'
BN = "BatchNormalization"
#: folded vs unfolded graph, both run by onnxruntime, relative to the output's scale (observed: ~2e-7 fp32, 4e-4 fp16).
RTOL = {TensorProto.FLOAT: 1e-5, TensorProto.FLOAT16: 1e-2}


# -- helpers ------------------------------------------------------------------------------------------------------------
def graph(text: str, **kwargs) -> onnx.ModelProto:
    """``build`` with every node named after its first output, so skip reasons name what the text says."""
    model = build(HEADER + text, **kwargs)
    for node in model.graph.node:
        node.name = node.output[0]
    onnx.checker.check_model(model, full_check=True)
    return model


def io_names(model: onnx.ModelProto) -> tuple[list[str], list[str]]:
    initializers = {t.name for t in model.graph.initializer}
    return [i.name for i in model.graph.input if i.name not in initializers], [o.name for o in model.graph.output]


def fold(model: onnx.ModelProto):
    """``bnfold.fold_graph`` plus what every result must satisfy whatever was folded."""
    before = model.SerializeToString()
    result = bnfold.fold_graph(model)
    assert model.SerializeToString() == before, "the model handed in was modified"
    onnx.checker.check_model(result.model, full_check=True)
    assert io_names(result.model) == io_names(model)
    return result


def assert_parity(original: onnx.ModelProto, folded: onnx.ModelProto, seeds: Iterable[int] = (1, 2)) -> None:
    elem = original.graph.output[0].type.tensor_type.elem_type
    for seed in seeds:
        inputs = feeds(original, seed)
        expected, got = run(original, inputs), run(folded, inputs)
        assert len(expected) == len(got)
        for e, g in zip(expected, got):
            assert e.shape == g.shape and e.dtype == g.dtype
            e64, g64 = e.astype(np.float64), g.astype(np.float64)
            scale = np.abs(e64).max() or 1.0
            assert np.abs(g64 - e64).max() <= RTOL[elem] * scale, (np.abs(g64 - e64).max(), scale)


def positions(result) -> dict[str, int]:
    return dict(Counter(f.position for f in result.folded))


def reasons(result) -> dict[str, str]:
    return {s.bn: s.reason for s in result.skipped}


def repvgg(*, dt: str = "float", w3: str = "4,4,3,3", a3: str = "pads=[1,1,1,1]", w1: str = "4,4,1,1",
           a1: str = "pads=[0,0,0,0]", identity: str | None = "bn", combine: str = "add", bias3: bool = False,
           outputs: Iterable[str] = (), nodes: Iterable[str] = (), params: Iterable[str] = (), out_hw: int = 6,
           root: str = "s") -> str:
    """A RepVGG block: 3x3 Conv -> BN, 1x1 Conv -> BN, an identity (a BN on x, x itself, or none), summed by a chain
    of Adds or one Sum into ``root``, then Relu -> y. ``nodes``/``params``/``outputs`` add lines, inputs, outputs."""
    inputs = [f"{dt}[{w3}] w3", *([f"{dt}[4] c3"] if bias3 else []), f"{dt}[4] s1", f"{dt}[4] b1", f"{dt}[4] m1",
              f"{dt}[4] v1", f"{dt}[{w1}] w1", f"{dt}[4] s2", f"{dt}[4] b2", f"{dt}[4] m2", f"{dt}[4] v2"]
    lines = [f"c3out = Conv <{a3}> (x, w3{', c3' if bias3 else ''})",
             "n3 = BatchNormalization (c3out, s1, b1, m1, v1)",
             f"c1out = Conv <{a1}> (x, w1)",
             "n1 = BatchNormalization (c1out, s2, b2, m2, v2)"]
    operands = ["n3", "n1"]
    if identity == "bn":
        inputs += [f"{dt}[4] s3", f"{dt}[4] b3", f"{dt}[4] m3", f"{dt}[4] v3"]
        lines.append("ni = BatchNormalization (x, s3, b3, m3, v3)")
        operands.append("ni")
    elif identity == "x":
        operands.append("x")
    if combine == "sum":
        lines.append(f"{root} = Sum ({', '.join(operands)})")
    else:
        acc = operands[0]
        for i, operand in enumerate(operands[1:]):
            name = root if i == len(operands) - 2 else f"add{i}"
            lines.append(f"{name} = Add ({acc}, {operand})")
            acc = name
    lines += [*nodes]
    if not any(line.startswith("y = ") for line in nodes):
        lines.append(f"y = Relu ({root})")
    outs = [f"{dt}[N,4,{out_hw},{out_hw}] y", *outputs]
    head = f"g ({dt}[N,4,6,6] x, {', '.join([*inputs, *params])}) => ({', '.join(outs)}) {{\n"
    return head + "\n".join(f"  {line}" for line in lines) + "\n}"


# -- branch merging -------------------------------------------------------------------------------------------------------
MERGES = {
    # name: (repvgg arguments, expected positions, Conv nodes left); the merged Conv writes the root Add's output "s"
    "add_chain": ({}, {"merge": 3}, 1),
    "sum_variadic": ({"combine": "sum"}, {"merge": 3}, 1),
    "plain_x_identity": ({"identity": "x"}, {"merge": 2}, 1),
    "no_identity": ({"identity": None}, {"merge": 2}, 1),
    "dense_conv_with_bias": ({"bias3": True}, {"merge": 3}, 1),
    # a 2x2 kernel with pads (begin 0, end 1) sits at offset 1 of the 3x3 with pads (1, 1)
    "asymmetric_pads_small_kernel": ({"w1": "4,4,2,2", "a1": "pads=[0,0,1,1]"}, {"merge": 3}, 1),
    # the 3x3 pads (0, 2): the 1x1 and the identity sit at its offset 0
    "asymmetric_pads_big_kernel": ({"a3": "pads=[0,0,2,2]"}, {"merge": 3}, 1),
    "dilated": ({"a3": "dilations=[2,2], pads=[2,2,2,2]", "a1": "dilations=[2,2], pads=[0,0,0,0]"}, {"merge": 3}, 1),
    "depthwise": ({"w3": "4,1,3,3", "a3": "group=4, pads=[1,1,1,1]", "w1": "4,1,1,1", "a1": "group=4, pads=[0,0,0,0]"},
                  {"merge": 3}, 1),
    "grouped_sum": ({"w3": "4,2,3,3", "a3": "group=2, pads=[1,1,1,1]", "w1": "4,2,1,1", "a1": "group=2, pads=[0,0,0,0]",
                     "combine": "sum"}, {"merge": 3}, 1),
    "stride2_without_identity": ({"identity": None, "a3": "strides=[2,2], pads=[1,1,1,1]",
                                  "a1": "strides=[2,2], pads=[0,0,0,0]", "out_hw": 3}, {"merge": 2}, 1),
    # the root Add's output is a graph output too: the merged Conv writes that name
    "root_is_graph_output": ({"outputs": ["float[N,4,6,6] s"]}, {"merge": 3}, 1),
    # (n3 + n1 + ni) + k with k a constant: the outer Add cannot merge, the sum inside it does
    "chain_then_constant_add": ({"nodes": ["s2c = Add (s, k)", "y = Relu (s2c)"], "params": ["float[4,1,1] k"]},
                                {"merge": 3}, 1),
    # a BN after the merged block folds into the merged Conv (which then writes the BN's output "p")
    "bn_after_block": ({"nodes": ["p = BatchNormalization (s, s4, b4, m4, v4)", "y = Relu (p)"],
                        "params": ["float[4] s4", "float[4] b4", "float[4] m4", "float[4] v4"]},
                       {"merge": 3, "after": 1}, 1),
}


@pytest.mark.parametrize("name", list(MERGES))
def test_branches_merge_into_one_conv(name):
    kwargs, expected, convs = MERGES[name]
    model = graph(repvgg(**kwargs))
    result = fold(model)
    assert positions(result) == expected, result.skipped
    assert result.skipped == []
    assert op_count(result.model, BN) == 0
    assert op_count(result.model, "Conv") == convs
    outside = sum(" = Add (" in line for line in kwargs.get("nodes", ()))  # Adds that are not part of the block
    assert op_count(result.model, "Add") == outside and op_count(result.model, "Sum") == 0
    (merge,) = {f.merge for f in result.folded if f.merge}
    assert merge.target.name == "c3out" and merge.root == "s"
    (conv,) = [n for n in result.model.graph.node if n.op_type == "Conv"]
    assert conv.output[0] == ("p" if "after" in expected else "s")  # whoever reads the Add (or the BN) reads it
    assert_parity(model, result.model)


def test_bn_before_a_pointwise_block_folds_into_the_merged_conv():
    """BN -> 1x1 Conv+BN, 1x1 Conv+BN, BN: the merged Conv pads nothing, so the BN before it folds too."""
    text = repvgg(w3="4,4,1,1", a3="pads=[0,0,0,0]", params=["float[4] s0", "float[4] b0", "float[4] m0",
                                                             "float[4] v0"])
    text = text.replace("float[N,4,6,6] x,", "float[N,4,6,6] x0,").replace("{\n", "{\n  x = BatchNormalization "
                                                                              "(x0, s0, b0, m0, v0)\n", 1)
    model = graph(text)
    result = fold(model)
    assert positions(result) == {"merge": 3, "before": 1}
    assert op_count(result.model, BN) == 0 and op_count(result.model, "Conv") == 1
    assert_parity(model, result.model)


REFUSED = {
    # name: (repvgg arguments, build arguments, {BN: substrings of its reason}, BNs left, Convs left)
    "pads_do_not_embed": ({"w1": "4,4,3,3", "a1": "pads=[0,0,2,2]"}, {},
                          {"ni": ("cannot merge", "does not sit inside")}, 1, 2),
    "auto_pad_same_upper": ({"a3": 'auto_pad="SAME_UPPER"'}, {}, {"ni": ("cannot merge", "cannot tell the padding")}, 1, 2),
    "different_strides": ({"a1": "strides=[2,2], pads=[3,3,3,3]"}, {}, {"ni": ("cannot merge", "stride")}, 1, 2),
    "different_groups": ({"w3": "4,2,3,3", "a3": "group=2, pads=[1,1,1,1]"}, {}, {"ni": ("cannot merge", "groups")}, 1, 2),
    "branch_conv_output_is_graph_output": ({"outputs": ["float[N,4,6,6] c1out"]}, {},
                                           {"n1": ("model output",), "ni": ("cannot merge",)}, 2, 2),
    # (n1 still folds into its own Conv, which then writes the graph output n1)
    "branch_bn_output_is_graph_output": ({"outputs": ["float[N,4,6,6] n1"]}, {}, {"ni": ("cannot merge",)}, 1, 2),
    # ni's statistics can be overridden at run time: ni stays (n3 + n1 inside the chain may still merge)
    "identity_bn_mean_is_a_graph_input": ({}, {"listed": ("m3",)}, {"ni": ("m3", "graph input")}, 1, None),
}


@pytest.mark.parametrize("name", list(REFUSED))
def test_branches_that_must_not_merge(name):
    kwargs, build_kwargs, why, bns_left, convs_left = REFUSED[name]
    model = graph(repvgg(**kwargs), **build_kwargs)
    result = fold(model)
    assert op_count(result.model, BN) == bns_left, result.skipped
    assert convs_left is None or op_count(result.model, "Conv") == convs_left
    found = reasons(result)
    for bn, needles in why.items():
        assert bn in found, found
        for needle in needles:
            assert needle.lower() in found[bn].lower(), found[bn]
    if convs_left == 2:
        assert "merge" not in positions(result)
    assert_parity(model, result.model)


def test_sum_with_a_constant_operand_is_not_merged():
    """Sum(n3, n1, ni, k) with k a constant: the block does not read one input only."""
    model = graph(repvgg(combine="sum", params=["float[4,1,1] k"]).replace("Sum (n3, n1, ni)", "Sum (n3, n1, ni, k)"))
    result = fold(model)
    assert "merge" not in positions(result)
    assert op_count(result.model, BN) == 1
    assert "cannot merge" in reasons(result)["ni"]
    assert_parity(model, result.model)


@pytest.mark.parametrize(("shared", "attrs"), [("w3", "pads=[1,1,1,1]"), ("w1", "pads=[0,0,0,0]")],
                         ids=["merge_target_weight", "other_branch_weight"])
def test_weight_shared_with_a_conv_elsewhere_is_kept(shared, attrs):
    """A branch weight is also the weight of a Conv after the block: that Conv must keep the original values
    (the merged Conv writes a copy when it is the target; another branch's weight is only read)."""
    model = graph(repvgg(nodes=["r = Relu (s)", f"y = Conv <{attrs}> (r, {shared})"]))
    original = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == shared))
    result = fold(model)
    assert positions(result) == {"merge": 3} and op_count(result.model, BN) == 0
    convs = {n.output[0]: n for n in result.model.graph.node if n.op_type == "Conv"}
    assert set(convs) == {"s", "y"}
    arrays = {t.name: numpy_helper.to_array(t) for t in result.model.graph.initializer}
    np.testing.assert_array_equal(arrays[convs["y"].input[1]], original)
    assert convs["s"].input[1] != convs["y"].input[1]
    assert_parity(model, result.model)


def test_weight_shared_by_two_branches_merges():
    """Two 3x3 branches read the same initializer (each with its own BN), plus the 1x1 and the identity."""
    text = repvgg(nodes=["c3bout = Conv <pads=[1,1,1,1]> (x, w3)", "n3b = BatchNormalization (c3bout, s5, b5, m5, v5)",
                         "t = Add (s, n3b)", "y = Relu (t)"],
                  params=["float[4] s5", "float[4] b5", "float[4] m5", "float[4] v5"])
    model = graph(text)
    result = fold(model)
    assert positions(result) == {"merge": 4}
    assert op_count(result.model, BN) == 0 and op_count(result.model, "Conv") == 1
    assert_parity(model, result.model)


def test_float16_graph_merges_within_fp16_tolerance():
    model = graph(repvgg(dt="float16", bias3=True, nodes=["p = BatchNormalization (s, s4, b4, m4, v4)", "y = Relu (p)"],
                         params=["float16[4] s4", "float16[4] b4", "float16[4] m4", "float16[4] v4"]))
    result = fold(model)
    assert positions(result) == {"merge": 3, "after": 1}
    assert op_count(result.model, BN) == 0 and op_count(result.model, "Conv") == 1
    assert {t.data_type for t in result.model.graph.initializer} == {TensorProto.FLOAT16}
    assert_parity(model, result.model, seeds=(1, 2, 3))


def test_fuse_and_plan_accept_the_graph():
    """The public entry points on a ModelProto: plan() changes nothing, fuse() proves the merge in onnxruntime."""
    model = graph(repvgg())
    before = model.SerializeToString()
    found = bnfold.plan(model)
    assert Counter(f.position for f in found.folds) == {"merge": 3} and found.skips == []
    result = bnfold.fuse(model, None)
    assert model.SerializeToString() == before
    assert result.ok and result.discovery == "onnx"
    assert positions(result) == {"merge": 3}
    assert op_count(result.model, BN) == 0 and op_count(result.model, "Conv") == 1
    assert {f.describe() for f in result.folded} == {"merged 3 branches into c3out"}
    document = result.to_dict()
    assert {b["bn"] for entry in document["folded"] for b in entry["merge"]["branches"]} == {"n3", "n1", "ni"}
    assert_parity(model, result.model)


FASTVIT = """g (float[N,4,6,W] x, float[4,1,3,3] w3, float[4] s1, float[4] b1, float[4] m1, float[4] v1,
                 float[4] s3, float[4] b3, float[4] m3, float[4] v3, float[LS] ls) => (float[N,4,6,W] y) {
  c3 = Conv <group=4, pads=[1,1,1,1]> (x, w3)
  n3 = BatchNormalization (c3, s1, b1, m1, v1)
  ni = BatchNormalization (x, s3, b3, m3, v3)
  d = Sub (n3, ni)
  e = Mul (ls, d)
  y = Add (x, e)
}"""


@pytest.mark.parametrize(("width", "scale_shape", "whole"), [
    (6, "4,1,1", True), (6, "1,4,1,1", True), (6, "1", True),
    (4, "4", False),  # a [4] scale broadcasts over the last axis (W = 4 here), not over the channels
], ids=["per_channel", "per_channel_rank4", "one_value", "last_axis_like_channels"])
def test_layer_scaled_difference(width, scale_shape, whole):
    """FastViT's x + layer_scale * (BN(conv(x)) - BN(x)): with a per-channel (or single) scale, one Conv."""
    model = graph(FASTVIT.replace("W]", f"{width}]").replace("float[LS] ls", f"float[{scale_shape}] ls"))
    result = fold(model)
    assert op_count(result.model, BN) == 0 and op_count(result.model, "Conv") == 1
    assert [n.op_type for n in result.model.graph.node] == (["Conv"] if whole else ["Conv", "Mul", "Add"])
    assert_parity(model, result.model)


# -- BN after a Concat ----------------------------------------------------------------------------------------------------
CONCAT_CONV = """g (float[N,4,6,6] x, float[3,4,1,1] wa, float[5,4,3,3] wb, float[5] cb, float[4,2,3,3] wt,
                   float[12] s, float[12] b, float[12] m, float[12] v) => (float[N,12,6,6] y) {
  a = Conv (x, wa)
  c = Conv <pads=[1,1,1,1]> (x, wb, cb)
  t = ConvTranspose <group=2, pads=[1,1,1,1]> (x, wt)
  k = Concat <axis=AXIS> (a, t, c)
  y = BatchNormalization (k, s, b, m, v)
}"""
CONCAT_GEMM = """g (float[N,6] x, float[6,3] wa, float[5,6] wb, float[5] cb, float[6,4] wm,
                   float[12] s, float[12] b, float[12] m, float[12] v) => (float[N,12] y) {
  a = Gemm (x, wa)
  c = Gemm <transB=1> (x, wb, cb)
  mm = MatMul (x, wm)
  k = Concat <axis=1> (a, c, mm)
  y = BatchNormalization (k, s, b, m, v)
}"""


@pytest.mark.parametrize(("text", "slices"), [
    (CONCAT_CONV.replace("AXIS", "1"), {"a": (0, 3), "t": (3, 7), "c": (7, 12)}),
    (CONCAT_CONV.replace("AXIS", "-3"), {"a": (0, 3), "t": (3, 7), "c": (7, 12)}),
    (CONCAT_GEMM, {"a": (0, 3), "c": (3, 8), "mm": (8, 12)}),
], ids=["conv_axis1", "conv_axis-3", "gemm_matmul"])
def test_bn_after_concat_folds_per_slice(text, slices):
    model = graph(text)
    result = fold(model)
    (f,) = result.folded
    assert f.position == "concat" and result.skipped == []
    assert {p.layer.name: p.channels for p in f.parts} == slices
    assert op_count(result.model, BN) == 0
    assert op_count(result.model, "Concat") == 1
    assert_parity(model, result.model)


def test_bn_after_concat_on_axis_2_is_not_folded():
    text = CONCAT_CONV.replace("AXIS", "2").replace("float[3,4,1,1] wa", "float[4,4,1,1] wa").replace(
        "float[5,4,3,3] wb, float[5] cb", "float[4,4,3,3] wb, float[4] cb").replace("[12]", "[4]").replace(
        "float[N,12,6,6] y", "float[N,4,18,6] y")
    model = graph(text)
    result = fold(model)
    assert result.folded == [] and op_count(result.model, BN) == 1
    assert "axis 2" in reasons(result)["y"] and "not the channel axis" in reasons(result)["y"]
    assert_parity(model, result.model)


def test_bn_after_concat_with_a_shared_operand_is_not_folded():
    text = CONCAT_CONV.replace("AXIS", "1").replace("=> (float[N,12,6,6] y)", "=> (float[N,12,6,6] y, float[N,3,6,6] a)")
    model = graph(text)
    result = fold(model)
    assert result.folded == [] and op_count(result.model, BN) == 1
    assert "Concat" in reasons(result)["y"]
    assert_parity(model, result.model)


# -- BN after an Add ------------------------------------------------------------------------------------------------------
ADD_CONVS = """g (float[N,4,6,6] x, float[N,4,6,6] x2, float[5,4,3,3] wa, float[5,4,1,1] wb, float[5] cb,
                 float[5] s, float[5] b, float[5] m, float[5] v) => (float[N,5,6,6] y) {
  a = Conv <pads=[1,1,1,1]> (x, wa)
  c = Conv (x2, wb, cb)
  k = Add (a, c)
  y = BatchNormalization (k, s, b, m, v)
}"""
ADD_MATMULS = """g (float[N,6] x, float[N,6] x2, float[6,5] wa, float[6,5] wb, float[5] cb,
                   float[5] s, float[5] b, float[5] m, float[5] v) => (float[N,5] y) {
  a = MatMul (x, wa)
  c0 = MatMul (x2, wb)
  c = Add (c0, cb)
  k = Add (a, c)
  y = BatchNormalization (k, s, b, m, v)
}"""
PARAMS = ("wa", "wb", "cb", "s", "b", "m", "v")


@pytest.mark.parametrize(("text", "shift"), [(ADD_CONVS, "c"), (ADD_MATMULS, "c0")], ids=["conv", "matmul"])
def test_bn_after_add_of_two_producers(text, shift):
    """Two inputs, one producer with a bias and one without: both take the scale, the biased one the shift."""
    model = graph(text, constants=PARAMS)
    result = fold(model)
    (f,) = result.folded
    assert f.position == "add" and result.skipped == []
    assert {p.layer.name for p in f.parts if p.shift} == {shift}
    assert len(f.parts) == 2 and all(p.channels is None for p in f.parts)
    assert op_count(result.model, BN) == 0
    assert io_names(result.model) == (["x", "x2"], ["y"])
    assert_parity(model, result.model)


def test_bn_after_add_with_a_graph_output_operand_is_not_folded():
    model = graph(ADD_CONVS.replace("=> (float[N,5,6,6] y)", "=> (float[N,5,6,6] y, float[N,5,6,6] a)"),
                  constants=PARAMS)
    result = fold(model)
    assert result.folded == [] and op_count(result.model, BN) == 1
    assert "also used elsewhere" in reasons(result)["y"]
    assert_parity(model, result.model)


# -- small torch modules, exported with the TorchScript exporter ---------------------------------------------------------
def conv_bn(cin: int, cout: int, k: int, stride: int = 1, padding: int = 0, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, padding, groups=groups, bias=False), nn.BatchNorm2d(cout))


class RepVGGBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1, groups: int = 1, post: bool = False) -> None:
        super().__init__()
        self.identity = nn.BatchNorm2d(cin) if cin == cout and stride == 1 else None
        self.dense, self.one = conv_bn(cin, cout, 3, stride, 1, groups), conv_bn(cin, cout, 1, stride, 0, groups)
        self.post = nn.BatchNorm2d(cout) if post else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        id_out = 0 if self.identity is None else self.identity(x)
        return torch.relu(self.post(self.dense(x) + self.one(x) + id_out))


class MobileOneBlock(nn.Module):
    def __init__(self, channels: int = 4, branches: int = 3) -> None:
        super().__init__()
        self.skip, self.scale = nn.BatchNorm2d(channels), conv_bn(channels, channels, 1, groups=channels)
        self.convs = nn.ModuleList([conv_bn(channels, channels, 3, 1, 1, channels) for _ in range(branches)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.scale(x) + self.skip(x)
        for conv in self.convs:
            out += conv(x)
        return torch.relu(out)


class CatHeads(nn.Module):
    """BN after a concat of convs; BatchNorm1d after a concat of Linears."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.bn = nn.Conv2d(4, 3, 1, bias=False), nn.Conv2d(4, 5, 3, padding=1), nn.BatchNorm2d(8)
        self.fa, self.fb, self.bn1d = nn.Linear(8, 3), nn.Linear(8, 5, bias=False), nn.BatchNorm1d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn(torch.cat([self.a(x), self.b(x)], 1)))
        v = y.mean((2, 3))
        return self.bn1d(torch.cat([self.fa(v), self.fb(v)], 1))


class AddHeads(nn.Module):
    """BN after the sum of two convs reading different tensors; BatchNorm1d after the sum of two Linears."""

    def __init__(self) -> None:
        super().__init__()
        self.ca, self.cb = nn.Conv2d(4, 6, 3, stride=2, padding=1, bias=False), nn.Conv2d(4, 6, 1)
        self.pool, self.bn = nn.AvgPool2d(2), nn.BatchNorm2d(6)
        self.fa, self.fb, self.bn1d = nn.Linear(6, 5, bias=False), nn.Linear(6, 5, bias=False), nn.BatchNorm1d(5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn(self.ca(x) + self.cb(self.pool(x))))
        v = y.mean((2, 3))
        return self.bn1d(self.fa(v) + self.fb(v.flip(1)))


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    return zoo.randomize_bn_statistics(model, torch.Generator().manual_seed(seed)).eval()


EXPORTED = {
    # name: (module, do_constant_folding, expected positions, Conv nodes left). Without constant folding the
    # exporter keeps every BN; with it, torch fuses each Conv -> BN pair itself and the identity BN is left to merge
    # (and a bias-less Linear is a MatMul of a constant rather than of a Transpose node).
    "repvgg": (lambda: RepVGGBlock(4, 4), False, {"merge": 3}, 1),
    "repvgg_constants_folded_by_torch": (lambda: RepVGGBlock(4, 4), True, {"merge": 1}, 1),
    "repvgg_groups2_then_bn": (lambda: RepVGGBlock(4, 4, groups=2, post=True), False, {"merge": 3, "after": 1}, 1),
    "repvgg_stride2": (lambda: RepVGGBlock(4, 8, stride=2), False, {"merge": 2}, 1),
    "mobileone_out_plus_equals": (MobileOneBlock, False, {"merge": 5}, 1),
    "concat_convs_and_linears": (CatHeads, True, {"concat": 2}, 2),
    "add_convs_and_linears": (AddHeads, True, {"add": 2}, 2),
}


@pytest.mark.parametrize("name", list(EXPORTED))
def test_exported_modules(name):
    make, fold_constants, expected, convs = EXPORTED[name]
    torch.manual_seed(0)
    module = randomize(make())
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (torch.randn(2, 4, 6, 6),), buffer, dynamo=False, do_constant_folding=fold_constants,
                          input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "n"}, "y": {0: "n"}})
    model = onnx.load_from_string(buffer.getvalue())
    assert op_count(model, BN) == sum(expected.values()) > 0
    result = fold(model)
    assert positions(result) == expected, result.skipped
    assert result.skipped == []
    assert op_count(result.model, BN) == 0
    assert op_count(result.model, "Conv") == convs
    assert_parity(model, result.model)
    # and the folded graph matches the float64 torch module, independently of onnxruntime's fp32 rounding
    x = np.random.default_rng(3).normal(size=(3, 4, 6, 6)).astype(np.float32)
    with torch.no_grad():
        expected_out = copy.deepcopy(module).double()(torch.from_numpy(x).double()).numpy()
    (got,) = run(result.model, {"x": x})
    assert np.abs(got - expected_out).max() <= 1e-5 * np.abs(expected_out).max()


@pytest.mark.parametrize("attrs", ["dilations=[0,0], pads=[0,0,0,0]", "strides=[0,0], pads=[0,0,0,0]",
                                   "pads=[-1,-1,1,1]"])
def test_invalid_conv_attributes_are_refused_not_crashed_on(attrs):
    """Attack: a branch Conv with a zero dilation or stride, or a negative pad (onnxruntime refuses such a graph).
    Expected: no merge and a reason, not a ZeroDivisionError inside the rule."""
    model = build(HEADER + repvgg(a1=attrs))  # not graph(): the checker refuses it, and that is the point
    for node in model.graph.node:
        node.name = node.output[0]
    result = bnfold.fold_graph(model)
    assert "merge" not in positions(result)
    assert "cannot tell the padding" in reasons(result)["ni"]


# -- weights computed from constants (weight standardisation) -----------------------------------------------------
def _std_conv_graph(noise: bool = False) -> onnx.ModelProto:
    """A weight-standardised conv (timm's StdConv2d, exported by TorchScript: the weight is normalised by a
    training-mode BatchNormalization over the stored weight) followed by a BN. ``noise``: the weight also gets
    ``RandomNormalLike`` noise, which must never be evaluated ahead of time."""
    from models.reparam import StdConv2d

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = StdConv2d(4, 6, 3)
            self.bn = nn.BatchNorm2d(6)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.bn(self.conv(x))

    model = randomize(Block()).eval()
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(2, 4, 6, 6),), buffer, dynamo=False, opset_version=17,
                          input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "N"}, "y": {0: "N"}})
    exported = onnx.load_from_string(buffer.getvalue())
    if noise:
        conv = next(n for n in exported.graph.node if n.op_type == "Conv")
        noisy = onnx.helper.make_node("RandomNormalLike", [conv.input[1]], ["noise"], scale=0.0)
        added = onnx.helper.make_node("Add", [conv.input[1], "noise"], ["noisy_weight"])
        position = list(exported.graph.node).index(conv)
        exported.graph.node.insert(position, added)
        exported.graph.node.insert(position, noisy)
        conv.input[1] = "noisy_weight"
    return exported


def test_a_weight_computed_from_constants_is_evaluated_and_the_bn_folds():
    model = _std_conv_graph()
    assert op_count(model, BN) == 2  # the standardisation (training mode, over the weight) and the real BN
    result = fold(model)
    assert op_count(result.model, BN) == 0 and positions(result) == {"after": 1}
    assert any("computed from constants alone" in note for note in result.notes)
    assert_parity(model, result.model)
    assert [f.bn.name for f in bnfold.plan(model).folds] == [f.bn.name for f in result.folded]  # the plan says so


def test_a_weight_with_random_noise_is_not_evaluated():
    model = _std_conv_graph(noise=True)
    result = bnfold.fold_graph(model)
    assert not result.folded and op_count(result.model, BN) == 2
    assert not any("computed from constants alone" in note for note in result.notes)


def test_a_computed_weight_past_the_size_bound_is_not_evaluated(monkeypatch):
    """Attack: a constant chain that would build a huge tensor in memory before any runtime sees it. The size of
    every intermediate is known from shape inference first; past the bound nothing is evaluated."""
    from bnfold.onnx import constants

    monkeypatch.setattr(constants, "MAX_ELEMENTS", 16)  # the std-conv's weight has 6*4*3*3 = 216 elements
    result = bnfold.fold_graph(_std_conv_graph())
    assert not result.folded and op_count(result.model, BN) == 2
    assert not any("computed from constants alone" in note for note in result.notes)
