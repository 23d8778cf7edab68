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
from bnfold.onnx.fold import discover_graph
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
