"""Every reference model: which BNs fold, which are skipped and why, and parity with the eval model."""

from __future__ import annotations

import pytest
import torch

import bnfold
from models import zoo

# (bn, layer, position) expected to fold, and {bn: reason fragment} expected to be skipped. Names from models/.
EXPECTED = {
    "resnet_tiny": (17, {}),
    "resnet_digits": (9, {}),
    "mobilenet_tiny": (17, {}),
    "densenet_tiny": (5, {"features.0.norm1": "not next to a conv/linear", "features.1.norm1": "also feeds cat_1",
                          "features.2.norm": "its operand cat is not a layer", "features.3.norm1": "not next to",
                          "features.4.norm1": "also feeds cat_3", "final_bn": "its operand cat_2 is not a layer"}),
    "efficientnet_tiny": (13, {}),
    "decoder_tiny": (2, {}),
    "audio_tiny": (4, {}),
    "video_tiny": (4, {}),
    "mlp_tiny": (3, {}),
    "untraceable_tiny": (4, {}),
    "bnact_tiny": (4, {}),
    "shared_output_tiny": (2, {"bn_shared": "also feeds add", "bn_split_a": "also feeds bn_split_b",
                               "bn_split_b": "also feeds bn_split_a"}),
    "special_tiny": (6, {"bn_e": "feeds padded conv conv_e"}),
    # Issue 9's rules: branch merging, per-slice folds through Concat, folds through Add, functional layers.
    "repvgg_tiny": (13, {}),
    "mobileone_tiny": (18, {}),
    "mixconv_tiny": (3, {}),
    "residual_bn_tiny": (4, {}),
    "same_pad_tiny": (5, {}),
    "reparam_negatives_tiny": (4, {"bn_a": "weight is computed in forward", "bn_b": "also used elsewhere"}),
    "repmixer_tiny": (11, {}),  # x + layer_scale * (mixer(x) - norm(x)): Sub, per-channel Mul, Identity modules
}
#: Models whose BNs only the structural rules remove (they need a static graph: fx, torch.export or ONNX).
STRUCTURAL = {"repvgg_tiny", "mobileone_tiny", "mixconv_tiny", "residual_bn_tiny", "repmixer_tiny"}
SPECIFIC_FOLDS = {
    ("mlp_tiny", "input_bn"): ("input_fc", "before"),
    ("mlp_tiny", "blocks.0.bn"): ("blocks.0.fc", "after"),
    ("special_tiny", "bn_d"): ("conv_d", "before"),
    ("special_tiny", "fbn"): ("fbn.conv", "after"),  # F.batch_norm with module-held statistics
    ("special_tiny", "bn_c"): ("conv_c", "after"),  # SyncBatchNorm
    ("decoder_tiny", "bn1"): ("up1", "after"),  # grouped ConvTranspose2d
    ("video_tiny", "up_bn"): ("up", "after"),  # ConvTranspose3d
    ("bnact_tiny", "bn3"): ("conv3", "after"),  # FrozenBatchNorm2d
}


@pytest.fixture(scope="module")
def results():
    cache = {}

    def get(name: str, method: str = "auto"):
        if (name, method) not in cache:
            spec = zoo.REFERENCE_MODELS[name]
            cache[name, method] = bnfold.fuse(zoo.build(name), (torch.randn(spec.input_shape),), method=method)
        return cache[name, method]

    return get


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_folds_skips_and_parity(results, name):
    result = results(name)
    n_folded, skipped = EXPECTED[name]
    assert result.ok, [c.to_dict() for c in result.parity]
    assert len(result.folded) == n_folded, [(f.bn.name, f.layer.name) for f in result.folded]
    assert {s.bn for s in result.skipped} == set(skipped)
    for skip in result.skipped:
        assert skipped[skip.bn] in skip.reason
    assert [c.label for c in result.parity] == ["batch 1", f"batch {zoo.REFERENCE_MODELS[name].input_shape[0]}"]
    for comparison in result.parity:
        for diff in comparison.outputs:
            assert diff.max_rel < 1e-5  # float32 folding keeps errors near one rounding


@pytest.mark.parametrize(("name", "bn"), sorted(SPECIFIC_FOLDS))
def test_specific_pairs(results, name, bn):
    folds = {f.bn.name: (f.layer.name, f.position) for f in results(name).folded}
    assert folds[bn] == SPECIFIC_FOLDS[name, bn]


@pytest.mark.parametrize("name", sorted(n for n, s in zoo.REFERENCE_MODELS.items() if s.traceable and n not in STRUCTURAL))
def test_fx_and_observed_discovery_agree(results, name):
    fx = results(name, "fx")
    observed = results(name, "observed")
    assert fx.discovery == "fx" and observed.discovery == "observed"
    key = lambda r: sorted((f.bn.name, f.layer.name, f.position) for f in r.folded)  # noqa: E731
    assert key(fx) == key(observed)
    assert sorted(s.bn for s in fx.skipped) == sorted(s.bn for s in observed.skipped)


def test_untraceable_model_folds_both_branches(results):
    result = results("untraceable_tiny")
    assert result.discovery == "observed"
    assert {"pos_bn", "neg_bn"} <= {f.bn.name for f in result.folded}
    assert any("torch.fx cannot trace" in n for n in result.notes)


def test_bn_modules_are_removed_and_activations_kept(results):
    model = results("bnact_tiny").model
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert isinstance(model.bn1, torch.nn.SiLU) and isinstance(model.bn2, torch.nn.ReLU)
    assert isinstance(model.bn3, torch.nn.Identity)


def test_input_model_is_not_modified():
    model = zoo.build("resnet_tiny")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    bnfold.fuse(model, (torch.randn(2, 3, 32, 32),))
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert isinstance(model.bn1, torch.nn.BatchNorm2d)


@pytest.mark.parametrize("name", ["resnet_tiny", "special_tiny", "shared_output_tiny", "untraceable_tiny"])
def test_plan_is_what_fuse_applies(name):
    # One meaning of "foldable": the public plan and the folds fuse makes are the same decisions.
    spec = zoo.REFERENCE_MODELS[name]
    inputs = [bnfold.InputSpec(tuple(spec.input_shape))]
    found = bnfold.plan(zoo.build(name), inputs)
    result = bnfold.fuse(zoo.build(name), inputs)
    assert result.ok
    assert {f.bn.name for f in found.folds} == {f.bn.name for f in result.folded}
    assert {s.bn for s in found.skips} <= {s.bn for s in result.skipped}
