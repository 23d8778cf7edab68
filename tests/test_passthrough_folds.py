"""A BN separated from its conv/linear by a pass-through node folds through it (issue 15 item 4): an Identity,
a Dropout that is not training (an eval ``nn.Dropout``, ``F.dropout(training=False)``, ONNX Dropout without a
true ``training_mode`` and with its mask unread). A training Dropout, or a pass-through read twice, does not."""

from __future__ import annotations

import copy

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bnfold
from bnfold.onnx.fold import discover_graph, fold_graph
from tests.onnx_graphs import build, header

X = torch.randn(2, 2, 8, 8, generator=torch.Generator().manual_seed(0))


def randomised(model: nn.Module) -> nn.Module:
    generator = torch.Generator().manual_seed(1)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-1, 1, generator=generator)
            module.running_var.uniform_(0.5, 2, generator=generator)
            module.weight.data.uniform_(0.5, 2, generator=generator)
    return model.eval()


class Between(nn.Module):
    """conv -> BETWEEN -> BN, three times: nn.Dropout + nn.Identity, nn.Dropout2d, F.dropout(training=False)."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2, self.c3 = nn.Conv2d(2, 3, 3), nn.Conv2d(3, 3, 1), nn.Conv2d(3, 3, 1)
        self.drop, self.same, self.drop2d = nn.Dropout(0.2), nn.Identity(), nn.Dropout2d(0.1)
        self.bn1, self.bn2, self.bn3 = nn.BatchNorm2d(3), nn.BatchNorm2d(3), nn.BatchNorm2d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn1(self.same(self.drop(self.c1(x))))
        x = self.bn2(self.drop2d(self.c2(x)))
        return self.bn3(F.dropout(self.c3(x), 0.3, training=self.training))


def reference(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The unfolded eval model in float64, cast back."""
    with torch.no_grad():
        return copy.deepcopy(model).double()(x.double()).float()


@pytest.mark.parametrize("form", ["eager", "pt2"])
def test_bns_fold_through_identities_and_eval_dropouts(form):
    model = randomised(Between())
    subject = model if form == "eager" else torch.export.export(model, (X,))
    result = bnfold.fuse(subject, (X,))
    assert result.ok and not result.skipped
    assert sorted((f.bn.name.rpartition(".")[0] or f.bn.name, f.layer.name.rpartition(".")[0] or f.layer.name)
                  for f in result.folded) == [("bn1", "c1"), ("bn2", "c2"), ("bn3", "c3")]
    folded = result.model if form == "eager" else result.model.module()
    with torch.no_grad():
        got = folded(X)
    want = reference(model, X)
    assert float((got - want).abs().max()) <= 1e-5 * float(want.abs().max())


def test_a_training_dropout_in_between_does_not_fold():
    class Training(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.bn(F.dropout(self.conv(x), 0.3, training=True))

    found = bnfold.plan(randomised(Training()), (X,))
    assert not found.folds and [s.code for s in found.skips] == ["not-adjacent"]


GRAPH = """g (float[N,2,4,4] x, float[3,2,1,1] w, float[3] s, float[3] b, float[3] m, float[3] v)
            => (float[N,3,4,4] y{extra_out}) {{
    r = Constant <value = float {{0.5}}> ()
    on = Constant <value = bool {{1}}> ()
    off = Constant <value = bool {{0}}> ()
    z = Conv (x, w)
    {between}
    y = BatchNormalization (i, s, b, m, v)
}}"""


def onnx_graph(between: str, opset: int, extra_out: str = ""):
    return build(header(opset) + GRAPH.format(between=between, extra_out=extra_out), ("w", "s", "b", "m", "v"))


def run(model, x: np.ndarray) -> np.ndarray:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), options).run(None, {"x": x})[0]


@pytest.mark.parametrize(("between", "opset"), [
    ("i = Identity (z)", 17), ("i = Dropout (z)", 17), ("i = Dropout (z)", 11), ("i = Dropout <ratio = 0.5> (z)", 9),
    ("i = Dropout (z, r, off)", 17), ("k = Identity (z)\n    i = Dropout (k)", 13),
], ids=["identity", "dropout-17", "dropout-11", "dropout-9-ratio", "training-mode-false", "identity-then-dropout"])
def test_onnx_bns_fold_through_pass_through_nodes(between, opset):
    model = onnx_graph(between, opset)
    result = bnfold.fuse(model)
    assert result.ok and len(result.folded) == 1 and not result.skipped
    ops = [n.op_type for n in result.model.graph.node]
    assert "BatchNormalization" not in ops and ops.count("Conv") == 1
    x = np.random.default_rng(2).normal(size=(3, 2, 4, 4)).astype(np.float32)
    want, got = run(model, x), run(result.model, x)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(np.abs(want).max()))


@pytest.mark.parametrize(("between", "extra_out"), [
    ("i = Dropout (z, r, on)", ""),  # training: random at inference (BN009), nothing to fold through
    ("i, mask = Dropout (z)", ", bool[N,3,4,4] mask"),  # its mask is read (a graph output)
    ("i = Identity (z)\n    j = Identity (i)", ", float[N,3,4,4] j"),  # the pass-through is read twice
])
def test_onnx_pass_through_nodes_that_do_not_fold(between, extra_out):
    found = discover_graph(onnx_graph(between, 17, extra_out))
    assert not found.folds and [s.code for s in found.skips] == ["not-adjacent"]


LAYOUT = """g ({inp}, float[3,2,1,1] w, float[{c}] s, float[{c}] b, float[{c}] m, float[{c}] v) => ({out}) {{
    {body}
}}"""
FOLDS_THROUGH = {
    # tf2onnx's NHWC graphs: every NCHW op between a Transpose pair; the pair between conv and BN cancels
    "nhwc-transpose-pair": ("float[N,4,4,2] xin", """x = Transpose <perm = [0, 3, 1, 2]> (xin)
    z = Conv (x, w)
    t = Transpose <perm = [0, 2, 3, 1]> (z)
    i = Transpose <perm = [0, 3, 1, 2]> (t)
    n = BatchNormalization (i, s, b, m, v)
    y = Transpose <perm = [0, 2, 3, 1]> (n)""", "float[N,4,4,3] y"),
    "flatten": ("float[N,2,1,1] x", """z = Conv (x, w)
    i = Flatten <axis = 1> (z)
    y = BatchNormalization (i, s, b, m, v)""", "float[N,3] y"),
    "reshape-keeping-channels": ("float[N,2,4,4] x", """z = Conv (x, w)
    shape = Constant <value = int64[3] {0, 3, 16}> ()
    i = Reshape (z, shape)
    y = BatchNormalization (i, s, b, m, v)""", "float[N,3,16] y"),
}
BLOCKS = {
    "a-lone-transpose": ("float[N,2,4,4] x", """z = Conv (x, w)
    i = Transpose <perm = [0, 1, 3, 2]> (z)
    y = BatchNormalization (i, s, b, m, v)""", "float[N,3,4,4] y", 3),
    "a-reshape-that-moves-channels": ("float[N,2,4,4] x", """z = Conv (x, w)
    shape = Constant <value = int64[4] {0, 6, 2, 4}> ()
    i = Reshape (z, shape)
    y = BatchNormalization (i, s, b, m, v)""", "float[N,6,2,4] y", 6),
}


def layout_graph(inp: str, body: str, out: str, channels: int = 3):
    return build(header(17) + LAYOUT.format(inp=inp, body=body, out=out, c=channels), ("w", "s", "b", "m", "v"))


@pytest.mark.parametrize("name", FOLDS_THROUGH)
def test_onnx_bns_fold_through_layout_changes_that_keep_channels(name):
    inp, body, out = FOLDS_THROUGH[name]
    model = layout_graph(inp, body, out)
    result = bnfold.fuse(model)
    assert result.ok and len(result.folded) == 1
    assert "BatchNormalization" not in [n.op_type for n in result.model.graph.node]
    shape = (3, 4, 4, 2) if name.startswith("nhwc") else (3, 2, 1, 1) if name == "flatten" else (3, 2, 4, 4)
    x = np.random.default_rng(3).normal(size=shape).astype(np.float32)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    name_in = model.graph.input[0].name
    want, got = (ort.InferenceSession(m.SerializeToString(), options).run(None, {name_in: x})[0]
                 for m in (model, result.model))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(np.abs(want).max()))


@pytest.mark.parametrize("name", BLOCKS)
def test_onnx_layout_changes_that_move_channels_block_the_fold(name):
    inp, body, out, channels = BLOCKS[name]
    found = discover_graph(layout_graph(inp, body, out, channels))
    assert not found.folds and [s.code for s in found.skips] == ["not-adjacent"]


def test_the_transpose_pair_a_bn_folded_through_goes_too():
    """tf2onnx's pair around the BN undoes itself once the BN is gone: Conv -> Transpose, as onnxruntime leaves it."""
    inp, body, out = FOLDS_THROUGH["nhwc-transpose-pair"]
    result = fold_graph(layout_graph(inp, body, out))
    assert [n.op_type for n in result.model.graph.node] == ["Transpose", "Conv", "Transpose"]
    assert result.model.graph.node[-1].output == ["y"]

