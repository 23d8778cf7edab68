"""Issue 15, item 5: parameters a graph computes from constants alone, anywhere on the fold path, are evaluated once
(:mod:`bnfold.onnx.constants`), so that the BN folds: a Conv bias ``Expand``-ed from a zero (torch.export's
exporter with ``optimize=False`` writes every bias so), a BN scale ``Cast`` from float16, a mean ``Reshape``-d, a
variance behind ``Identity`` nodes, a Conv weight ``Unsqueeze``-d, a MatMul weight ``Transpose``-d, the bias ``Add``
after it ``CastLike``-d, a layer scale ``Reshape``-d. And what must never be evaluated: a value computed from a
graph input, from an initializer a caller can override, through a random operator, read elsewhere too (by a node
or a subgraph), past the size bound, or one that is no per-channel constant.

Every folded graph passes onnx.checker's full check and matches the unfolded graph in onnxruntime with graph
optimisations off (``tests.onnx_graphs._check``: max |folded - original| <= 1e-5 + 1e-4 * max |original|).
"""

from __future__ import annotations

import time
import warnings

import onnx
import pytest
import torch
from torch import nn

import bnfold
from bnfold.onnx.io import has_external_data, load_onnx
from tests.onnx_graphs import _check, build, header, op_count

BN = "BatchNormalization"
EVALUATED = "computed from constants alone"


def folded(model: onnx.ModelProto):
    """``bnfold.fold_graph``, checked: the model handed in is unchanged, the plan is what was folded, the folded
    graph passes the checker and matches the original in onnxruntime."""
    before = model.SerializeToString()
    result = bnfold.fold_graph(model)
    assert model.SerializeToString() == before, "the model handed in was modified"
    assert [f.bn.name for f in bnfold.plan(model).folds] == [f.bn.name for f in result.folded]
    _check(model, result.model)
    return result


# Every parameter on the fold path is computed from constants; the Constant `four` is read by two chains.
COMPUTED = header() + """g (float[N,3,6,6] x, float[4,3,3] w3, float16[4] s16, float[4] b, float[2,2] m4, float[4] v0,
       float[5,4] wt, float[5] c5, float[5] s2, float[5] b2, float[5] m2, float[5] v2)
       => (float[N,4,6,6] y, float[N,5] y2) {
    axes = Constant <value = int64[1] {2}> ()
    w = Unsqueeze (w3, axes)
    zero = Constant <value = float {0}> ()
    four = Constant <value = int64[1] {4}> ()
    c = Expand (zero, four)
    z = Conv <pads = [0,1,0,1]> (x, w, c)
    s = Cast <to = 1> (s16)
    m = Reshape (m4, four)
    v1 = Identity (v0)
    v = Identity (v1)
    y = BatchNormalization (z, s, b, m, v)
    p = ReduceMean <axes = [2, 3], keepdims = 0> (y)
    wm = Transpose (wt)
    q = MatMul (p, wm)
    cb = CastLike (c5, x)
    qb = Add (q, cb)
    y2 = BatchNormalization (qb, s2, b2, m2, v2)
}"""


def test_parameters_computed_from_constants_are_evaluated_and_every_bn_folds():
    model = build(COMPUTED)
    result = folded(model)
    assert len(result.folded) == 2 and not result.skipped
    assert [n.op_type for n in result.model.graph.node] == ["Conv", "ReduceMean", "MatMul", "Add"]
    notes = [note for note in result.notes if EVALUATED in note]
    assert len(notes) == 4, result.notes  # the Conv (weight, bias), the first BN, the MatMul, its bias Add
    assert any("'w', 'c'" in note and "Expand, Unsqueeze" in note for note in notes)
    assert any("'s', 'm', 'v'" in note and "Cast, Identity, Reshape" in note for note in notes)


def test_a_computed_layer_scale_is_evaluated_and_the_branches_merge():
    """x + ls * BN(depthwise conv(x)) with ls = Reshape(ls0, [4, 1, 1]): a per-channel scale once evaluated, so
    the identity branch, the BN and the scale merge into one Conv."""
    model = build(header() + """g (float[N,4,6,6] x, float[4,1,3,3] w, float[4] s, float[4] b, float[4] m,
                                   float[4] v, float[4] ls0) => (float[N,4,6,6] y) {
        shape = Constant <value = int64[3] {4, 1, 1}> ()
        ls = Reshape (ls0, shape)
        c = Conv <group = 4, pads = [1,1,1,1]> (x, w)
        n = BatchNormalization (c, s, b, m, v)
        e = Mul (ls, n)
        y = Add (x, e)
    }""")
    assert not bnfold.fold_graph(_without_reshape(model)).skipped  # the same graph with a stored scale merges
    result = folded(model)
    assert [n.op_type for n in result.model.graph.node] == ["Conv"], result.skipped
    assert any(EVALUATED in note and "'ls'" in note for note in result.notes)


def _without_reshape(model: onnx.ModelProto) -> onnx.ModelProto:
    plain = onnx.ModelProto()
    plain.CopyFrom(model)
    ls0 = next(t for t in plain.graph.initializer if t.name == "ls0")
    ls0.name = "ls"
    ls0.dims[:] = [4, 1, 1]
    kept = [n for n in plain.graph.node if n.output[0] not in ("shape", "ls")]
    del plain.graph.node[:]
    plain.graph.node.extend(kept)
    return plain


class _Net(nn.Module):
    """Conv (no bias) + BN + ReLU, Conv (bias) + BN, then Linear + BN1d: torch.export writes each conv bias as
    Expand(CastLike(0, x), Expand(Shape(weight), [1])) without its optimiser."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.fc, self.bn3 = nn.Linear(6, 5), nn.BatchNorm1d(5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return self.bn3(self.fc(x.mean((2, 3))))


def test_torch_export_without_its_optimiser_folds_every_bn(tmp_path):
    torch.manual_seed(0)
    net = _Net()
    for bn in (net.bn1, net.bn2, net.bn3):
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.uniform_(-1, 1)
    path = tmp_path / "net.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net.eval(), (torch.randn(2, 3, 8, 8),), str(path), dynamo=True, optimize=False,
                          external_data=True, verbose=False)
    assert has_external_data(path)
    model = load_onnx(path)
    assert op_count(model, BN) == 3 and op_count(model, "Expand") > 0
    result = folded(model)
    assert len(result.folded) == 3 and not result.skipped and op_count(result.model, BN) == 0
    assert op_count(result.model, "Expand") == op_count(result.model, "CastLike") == 0
    fused = bnfold.fuse(model, None)  # the proof bnfold fuse gives, in onnxruntime
    assert fused.ok and len(fused.folded) == 3


# Conv's bias is computed; BIAS says how. Must-not-evaluate cases: (how the bias is computed, what build() makes
# of the parameters, the node that must stay)
CONV_BIAS = """g (float[N,2,4,4] x, float[4,2,3,3] w, float[4] c0, float[4] s, float[4] b, float[4] m,
               float[4] v EXTRA) => (float[N,4,4,4] y OUTPUTS) {
    BIAS
    z = Conv <pads = [1,1,1,1]> (x, w, c)
    y = BatchNormalization (z, s, b, m, v)
}"""
NEGATIVES = {
    # A value fed at run time is not a constant, however few nodes stand between it and the bias.
    "from_a_graph_input": ("c = Identity (fed)", ", float[4] fed", "", {}, "Identity"),
    # An initializer also listed as a graph input can be overridden at run time.
    "from_an_overridable_initializer": ("c = Identity (c0)", "", "", {"listed": ("c0",)}, "Identity"),
    # A random operator is never evaluated ahead of time, even one whose draw is multiplied by zero.
    "random_on_the_path": ("""r = RandomNormal <shape = [4], seed = 1.0> ()
                              zero = Constant <value = float {0}> ()
                              rz = Mul (r, zero)
                              c = Add (c0, rz)""", "", "", {}, "RandomNormal"),
    # A chain node that another node reads too stays computed.
    "read_by_another_node": ("""c1 = Identity (c0)
                                c = Identity (c1)
                                o = Neg (c1)""", "", ", float[4] o", {}, "Identity"),
    # ... and so does one a subgraph reads.
    "read_in_a_subgraph": ("""c1 = Identity (c0)
                              c = Identity (c1)
                              yes = Constant <value = bool {1}> ()
                              o = If (yes) <then_branch = t () => (float[4] to) { to = Identity (c1) },
                                            else_branch = e () => (float[4] eo) { eo = Identity (c0) }>""",
                           "", ", float[4] o", {}, "Identity"),
}


def _negative(name: str) -> onnx.ModelProto:
    bias, extra, outputs, kwargs, _ = NEGATIVES[name]
    text = CONV_BIAS.replace("BIAS", bias).replace(" EXTRA", extra).replace(" OUTPUTS", outputs)
    constants = ("w", "c0", "s", "b", "m", "v")
    return build(header() + text, constants, **kwargs)


@pytest.mark.parametrize("name", list(NEGATIVES))
def test_a_bias_that_is_not_a_constant_is_not_evaluated(name):
    kept = NEGATIVES[name][-1]
    model = _negative(name)
    result = folded(model)
    assert not result.folded and op_count(result.model, BN) == 1
    assert op_count(result.model, kept) == op_count(model, kept) > 0
    assert not any(EVALUATED in note for note in result.notes)
    assert "'c' is computed by node" in result.skipped[0].reason, result.skipped[0].reason


def test_a_computed_bias_past_the_size_bound_is_not_evaluated(monkeypatch):
    from bnfold.onnx import constants

    monkeypatch.setattr(constants, "MAX_ELEMENTS", 3)  # every computed parameter has 4 or more elements
    model = build(COMPUTED)
    result = folded(model)
    assert not result.folded and op_count(result.model, BN) == 2
    assert [n.op_type for n in result.model.graph.node] == [n.op_type for n in model.graph.node]
    assert not any(EVALUATED in note for note in result.notes)


def test_an_expand_to_two_to_the_forty_elements_is_never_built():
    """Attack: a bias Expand-ed to 2**40 elements (4 TiB). Its size is known from shape inference on its actual
    inputs before it runs; past the bound nothing runs. (onnxruntime cannot run this graph: no parity check.)"""
    model = build(header() + CONV_BIAS.replace("BIAS", """zero = Constant <value = float {0}> ()
        huge = Constant <value = int64[1] {1099511627776}> ()
        c = Expand (zero, huge)""").replace(" EXTRA", "").replace(" OUTPUTS", ""), ("w", "c0", "s", "b", "m", "v"))
    start = time.perf_counter()
    result = bnfold.fold_graph(model)
    assert time.perf_counter() - start < 30
    assert not result.folded and op_count(result.model, "Expand") == 1
    assert not any(EVALUATED in note for note in result.notes)


def test_a_computed_constant_that_is_no_per_channel_one_stays_computed():
    """An Add of a constant Expand-ed over channels and positions is no bias and no layer scale: evaluating it would
    only grow the model."""
    model = build(header() + """g (float[N,4,6,6] x, float[4,4,1,1] w, float[1] zero) => (float[N,4,6,6] y) {
        shape = Constant <value = int64[4] {1, 4, 6, 6}> ()
        e = Expand (zero, shape)
        z = Conv (x, w)
        y = Add (z, e)
    }""")
    result = folded(model)
    assert op_count(result.model, "Expand") == 1
    assert not any(EVALUATED in note for note in result.notes)
