"""Edge cases of bnfold.fuse: one commented topology per case, seeded, with must-not-fold cases."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bnfold
from bnfold.discover import graph
from models.zoo import randomize_bn_statistics


def _stats(model: nn.Module, seed: int = 0) -> nn.Module:
    randomize_bn_statistics(model, torch.Generator().manual_seed(seed))
    return model.eval()


class SharedBN(nn.Module):
    """One BN module applied after two convs: runs twice, must not fold."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.bn = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.a(x)) + self.bn(self.b(x))


class SharedConv(nn.Module):
    """One conv applied twice (weight sharing) before a BN: folding would change both calls."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv(self.conv(x)))


class DictOut(nn.Module):
    """Several outputs in a dict and a tuple: every one is compared."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.fc, self.bn1d = nn.Linear(6, 5), nn.BatchNorm1d(5)

    def forward(self, x):
        feat = F.relu(self.bn(self.conv(x)))
        return {"logits": self.bn1d(self.fc(feat.mean((2, 3)))), "aux": (feat, feat.sum())}


class OpaqueBN(nn.BatchNorm2d):
    """A BN subclass whose forward does something bnfold cannot name: must be skipped, not guessed."""

    def forward(self, x):
        return super().forward(x) * 2.0


class WithOpaque(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 1), OpaqueBN(4)

    def forward(self, x):
        return self.bn(self.conv(x))


class BadLinearAxis(nn.Module):
    """Linear over the last axis of a 3-D tensor, then BatchNorm1d over axis 1: the wrong axis, must not fold."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.bn = nn.Linear(6, 6), nn.BatchNorm1d(4)

    def forward(self, x):  # x: (N, 4, 6)
        return self.bn(self.fc(x))


def conv_bn() -> nn.Module:
    return _stats(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()))


def test_bn_called_twice_is_skipped():
    result = bnfold.fuse(_stats(SharedBN()), (torch.randn(2, 3, 4, 4),))
    assert result.ok and not result.folded
    assert "runs 2 times per forward" in result.skipped[0].reason


def test_shared_conv_is_skipped():
    result = bnfold.fuse(_stats(SharedConv()), (torch.randn(2, 4, 4, 4),))
    assert result.ok and not result.folded
    assert "runs 2 times per forward" in result.skipped[0].reason


def test_dict_and_tuple_outputs_are_all_compared():
    result = bnfold.fuse(_stats(DictOut()), (torch.randn(3, 3, 6, 6),))
    assert result.ok and len(result.folded) == 2
    names = [o.name for o in result.parity[-1].outputs]
    assert names == ["output['logits']", "output['aux'][0]", "output['aux'][1]"]


def test_opaque_bn_subclass_is_skipped_with_reason():
    result = bnfold.fuse(_stats(WithOpaque()), (torch.randn(2, 3, 4, 4),))
    assert result.ok and not result.folded
    assert "overrides forward()" in result.skipped[0].reason
    assert isinstance(result.model.bn, OpaqueBN)


def test_linear_bn1d_on_the_wrong_axis_is_skipped():
    result = bnfold.fuse(_stats(BadLinearAxis()), (torch.randn(2, 4, 6),))
    assert result.ok and not result.folded
    assert "rank 3" in result.skipped[0].reason


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_statistics_are_skipped(bad):
    model = conv_bn()
    model[1].running_var[2] = bad
    result = bnfold.fuse(model, (torch.randn(2, 3, 4, 4),))
    assert not result.folded
    assert "running_var is not finite (channel 2" in result.skipped[0].reason


def test_track_running_stats_false_is_skipped():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, track_running_stats=False)).eval()
    result = bnfold.fuse(model, (torch.randn(4, 3, 4, 4),))
    assert not result.folded and "batch statistics" in result.skipped[0].reason


@pytest.mark.parametrize(("dtype", "max_rel"), [(torch.float16, 5e-3), (torch.bfloat16, 4e-2)])
def test_low_precision_models_fold_in_float64(dtype, max_rel):
    model = _stats(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8),
                                 nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8))).to(dtype)
    result = bnfold.fuse(model, [bnfold.InputSpec((2, 3, 6, 6), dtype)])
    assert result.ok, [c.to_dict() for c in result.parity]
    assert len(result.folded) == 2
    assert result.model[0].weight.dtype == dtype and result.model[0].bias.dtype == dtype
    assert all(o.max_rel < max_rel for c in result.parity for o in c.outputs)


def test_observed_discovery_reverts_a_fold_that_changes_outputs(monkeypatch):
    """If observation proposes a wrong pair, the numerical check must take it back and say so."""

    class Hidden(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn, self.good, self.good_bn = nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3), nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)

        def forward(self, x):
            y = self.conv(x)
            return self.good_bn(self.good(self.bn(y) + y))  # conv feeds bn AND the add

    model = _stats(Hidden())
    real_pair = graph.pair

    def forgetful_pair(nodes, method):  # simulate a discovery that missed the second user of `conv`
        for node in nodes.values():
            if node.layer is not None and node.layer.name == "conv":
                node.users = node.users[:1]
        return real_pair(nodes, method)

    monkeypatch.setattr("bnfold.discover.observed.pair", forgetful_pair)
    result = bnfold.fuse(model, (torch.randn(2, 3, 4, 4),), method="observed")
    assert result.ok
    assert [f.bn.name for f in result.folded] == ["good_bn"]
    reverted = [s for s in result.skipped if s.bn == "bn"]
    assert reverted and reverted[0].reason.startswith("reverted: folding into conv changed the outputs")
    assert any("reverted after numerical checks" in n for n in result.notes)


def test_model_in_training_mode_is_folded_as_deployed():
    model = conv_bn().train()
    model[2].eval()  # mixed flags must come back exactly as they were
    result = bnfold.fuse(model, (torch.randn(4, 3, 4, 4),))
    assert result.ok and result.was_training and len(result.folded) == 1
    assert [m.training for m in model.modules()] == [True, True, True, False]  # the caller's flags are restored
    assert not result.model.training


def test_fp16_overflow_is_skipped_not_written_as_inf():
    model = nn.Sequential(nn.Conv2d(1, 1, 1, bias=False), nn.BatchNorm2d(1)).eval()
    with torch.no_grad():
        model[0].weight.fill_(300.0)
        model[1].running_var.fill_(1e-8)  # scale 1/sqrt(1e-5) ~ 316: 300 * 316 > 65504
    model = model.half()
    result = bnfold.fuse(model, [bnfold.InputSpec((2, 1, 2, 2), torch.float16)])
    assert not result.folded
    assert "overflow float16" in result.skipped[0].reason
    assert torch.isfinite(result.model[0].weight).all()


def test_exported_program_is_not_reported_as_training():
    """ep.module() says training=True whatever the export mode: a program must not be flagged for it."""
    program = torch.export.export(conv_bn(), (torch.randn(2, 3, 4, 4),))
    result = bnfold.fuse(program, (torch.randn(2, 3, 4, 4),))
    assert result.ok and len(result.folded) == 1 and not result.was_training


def test_bn_on_both_sides_of_a_biasless_conv():
    # BN -> Conv(bias=False) -> BN: the first fold gives the conv a bias; the second must build on it, not on the
    # "no bias" seen at discovery time (it used to overwrite the first fold's shift with zeros).
    model = nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 1, bias=False), nn.BatchNorm2d(4)).eval()
    generator = torch.Generator().manual_seed(0)
    for bn in (model[0], model[2]):
        with torch.no_grad():
            bn.running_mean.uniform_(-1, 1, generator=generator)
            bn.running_var.uniform_(0.5, 2, generator=generator)
            bn.weight.uniform_(0.5, 2, generator=generator)
            bn.bias.uniform_(-1, 1, generator=generator)
    result = bnfold.fuse(model, (torch.randn(2, 3, 8, 8, generator=generator),))
    assert sorted(f.position for f in result.folded) == ["after", "before"] and not result.skipped
    assert result.ok, [c.worst().figure() for c in result.parity]
