"""The re-parameterisable reference models (models/reparam.py) themselves: structure, determinism,
traceability flags, torch.export, and the numerical facts the negatives rely on. No bnfold here."""

from __future__ import annotations

import operator
import warnings

import pytest
import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from models import zoo
from models.reparam import Conv2dSame, FunctionalLinear, StdConv2d

# Every BatchNorm module path, in definition order.
EXPECTED_BNS = {
    "repvgg_tiny": [
        "stage0.rbr_dense.bn", "stage0.rbr_1x1.bn",
        *[f"stage1.{i}.{b}" for i in range(3) for b in ("rbr_identity", "rbr_dense.bn", "rbr_1x1.bn")],
        "stage2.0.rbr_dense.bn", "stage2.0.rbr_1x1.bn",
    ],
    "mobileone_tiny": [
        "stage0.rbr_conv.0.bn", "stage0.rbr_scale.bn",
        "stage1.0.rbr_skip", *[f"stage1.0.rbr_conv.{i}.bn" for i in range(3)], "stage1.0.rbr_scale.bn",
        "stage1.1.rbr_skip", *[f"stage1.1.rbr_conv.{i}.bn" for i in range(3)],
        *[f"stage2.0.rbr_conv.{i}.bn" for i in range(3)], "stage2.0.rbr_scale.bn",
        *[f"stage2.1.rbr_conv.{i}.bn" for i in range(3)],
    ],
    "mixconv_tiny": ["stem_bn", "mix.bn", "incept.bn"],
    "residual_bn_tiny": ["stem_bn", "block1.bn", "block2.bn", "bn_fc"],
    "same_pad_tiny": ["bn1", "bn2", "bn3", "bn4", "bn_fc"],
    "reparam_negatives_tiny": ["bn_a", "bn_b", "bn_d1", "bn_d2", "bn_c1", "bn_c2"],
}
NAMES = sorted(EXPECTED_BNS)


def example(name: str, batch: int | None = None) -> torch.Tensor:
    shape = list(zoo.REFERENCE_MODELS[name].input_shape)
    if batch is not None:
        shape[0] = batch
    return torch.randn(shape, generator=torch.Generator().manual_seed(1))


def bn_paths(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def capture_inputs(model: nn.Module, x: torch.Tensor, names: list[str]) -> dict[str, torch.Tensor]:
    """Run the model once and return the first positional input each named submodule saw."""
    seen: dict[str, torch.Tensor] = {}
    modules = dict(model.named_modules())
    handles = [modules[n].register_forward_pre_hook(lambda m, a, n=n: seen.setdefault(n, a[0])) for n in names]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return seen


@pytest.fixture(scope="module")
def built():
    return {name: zoo.build(name) for name in NAMES}


# -- every model ------------------------------------------------------------------------------------------------------
def test_all_registered():
    assert set(NAMES) <= set(zoo.REFERENCE_MODELS)


@pytest.mark.parametrize("name", NAMES)
def test_deterministic_and_runs(built, name):
    model, x = built[name], example(name)
    with torch.no_grad():
        out = model(x)
        assert out.shape == (x.shape[0], 10) and torch.isfinite(out).all()
        assert model(x[:1]).shape == (1, 10)
        assert torch.equal(zoo.build(name)(x), out)
        assert not torch.allclose(zoo.build(name, seed=1)(x), out)
    assert not model.training


@pytest.mark.parametrize("name", NAMES)
def test_bn_paths_and_statistics(built, name):
    model = built[name]
    assert bn_paths(model) == EXPECTED_BNS[name]
    for path in EXPECTED_BNS[name]:
        bn = model.get_submodule(path)
        assert not torch.allclose(bn.running_mean, torch.zeros_like(bn.running_mean))  # zoo.build randomised them


@pytest.mark.parametrize("name", NAMES)
def test_fx_traceability_matches_registry(built, name):
    try:
        torch.fx.symbolic_trace(built[name])
        traced = True
    except torch.fx.proxy.TraceError:
        traced = False
    assert traced == zoo.REFERENCE_MODELS[name].traceable


@pytest.mark.parametrize("name", NAMES)
def test_torch_export(built, name):
    model, x = built[name], example(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exported = torch.export.export(model, (x,), strict=False)
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(x), model(x))


# -- RepVGG -----------------------------------------------------------------------------------------------------------
def test_repvgg_blocks(built):
    model = built["repvgg_tiny"]
    stride1 = ["stage1.0", "stage1.1", "stage1.2"]
    stride2 = ["stage0", "stage2.0"]
    for path in stride1 + stride2:
        block = model.get_submodule(path)
        dense, one = block.rbr_dense, block.rbr_1x1
        assert list(dict(dense.named_children())) == ["conv", "bn"] == list(dict(one.named_children()))
        assert dense.conv.kernel_size == (3, 3) and dense.conv.padding == (1, 1) and dense.conv.bias is None
        assert one.conv.kernel_size == (1, 1) and one.conv.padding == (0, 0) and one.conv.bias is None
        assert dense.conv.stride == one.conv.stride == ((1, 1) if path in stride1 else (2, 2))
        if path in stride1:
            assert type(block.rbr_identity) is nn.BatchNorm2d
        else:
            assert block.rbr_identity is None
    grouped = model.get_submodule("stage1.2")
    assert grouped.rbr_dense.conv.groups == 2 == grouped.rbr_1x1.conv.groups
    # forward is exactly relu(dense + 1x1 + identity)
    block, x = model.get_submodule("stage1.2"), torch.randn(2, 16, 8, 8)
    with torch.no_grad():
        expected = torch.relu(block.rbr_dense(x) + block.rbr_1x1(x) + block.rbr_identity(x))
        torch.testing.assert_close(block(x), expected)


# -- MobileOne --------------------------------------------------------------------------------------------------------
def test_mobileone_blocks(built):
    model = built["mobileone_tiny"]
    # path: (kernel, stride, groups, has skip, has scale, conv branches)
    layout = {
        "stage0": (3, 2, 1, False, True, 1),
        "stage1.0": (3, 1, 16, True, True, 3), "stage1.1": (1, 1, 1, True, False, 3),
        "stage2.0": (3, 2, 16, False, True, 3), "stage2.1": (1, 1, 1, False, False, 3),
    }
    assert len(model.stage0.rbr_conv) == 1 and len(model.stage1) == len(model.stage2) == 2
    for path, (k, stride, groups, skip, scale, branches) in layout.items():
        block = model.get_submodule(path)
        assert isinstance(block.rbr_conv, nn.ModuleList) and len(block.rbr_conv) == block.num_conv_branches == branches
        for branch in block.rbr_conv:
            assert branch.conv.kernel_size == (k, k) and branch.conv.stride == (stride, stride)
            assert branch.conv.groups == groups and isinstance(branch.bn, nn.BatchNorm2d)
        assert (type(block.rbr_skip) is nn.BatchNorm2d) if skip else block.rbr_skip is None
        if scale:
            assert block.rbr_scale.conv.kernel_size == (1, 1) and block.rbr_scale.conv.groups == groups
        else:
            assert block.rbr_scale is None
    block, x = model.get_submodule("stage1.0"), torch.randn(2, 16, 8, 8)
    with torch.no_grad():
        expected = block.rbr_skip(x) + block.rbr_scale(x) + sum(b(x) for b in block.rbr_conv)
        torch.testing.assert_close(block(x), torch.relu(expected))


# -- concat -----------------------------------------------------------------------------------------------------------
def test_mixconv_and_inception_blocks(built):
    model = built["mixconv_tiny"]
    mixed = model.mix.conv
    assert mixed.splits == [6, 5, 5]
    assert list(mixed) == ["0", "1", "2"]
    for conv, k, ch in zip(mixed.values(), (3, 5, 7), mixed.splits):
        assert conv.kernel_size == (k, k) and conv.padding == (k // 2, k // 2)
        assert conv.groups == ch == conv.in_channels == conv.out_channels
        assert conv.bias is None
    assert model.mix.bn.num_features == 16
    incept = model.incept
    assert incept.bn.num_features == incept.branch1x1.out_channels + incept.branch3x3.out_channels == 24
    x = torch.randn(2, 16, 8, 8)
    with torch.no_grad():
        parts = torch.split(x, [6, 5, 5], 1)
        cat = torch.cat([conv(p) for conv, p in zip(mixed.values(), parts)], 1)
        torch.testing.assert_close(model.mix(x), torch.relu(model.mix.bn(cat)))
        cat = torch.cat([incept.branch1x1(x), incept.branch3x3(x)], 1)
        torch.testing.assert_close(incept(x), torch.relu(incept.bn(cat)))


# -- BN after add -----------------------------------------------------------------------------------------------------
def test_residual_bn_blocks(built):
    model, x = built["residual_bn_tiny"], example("residual_bn_tiny")
    seen = capture_inputs(model, x, ["block1.conv_a", "block1.conv_b", "block2.conv_a", "block2.conv_b"])
    assert seen["block1.conv_a"] is seen["block1.conv_b"]  # same input tensor
    assert seen["block2.conv_a"].shape[-2:] == (8, 8) and seen["block2.conv_b"].shape[-2:] == (4, 4)  # different
    assert model.block2.conv_a.bias is None and model.block2.conv_b.bias is not None
    for block in (model.block1, model.block2):
        assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in (block.conv_a, block.conv_b))
    h = torch.randn(2, 32)
    with torch.no_grad():
        y = model.bn_fc(model.fc_a(h) + model.fc_b(h))
    assert isinstance(model.bn_fc, nn.BatchNorm1d) and y.shape == (2, 16)


# -- conv / linear subclasses -----------------------------------------------------------------------------------------
def test_conv2d_same_equals_conv_on_manually_padded_input(built):
    model, x = built["same_pad_tiny"], example("same_pad_tiny")
    # (left, right, top, bottom) TF 'SAME' padding worked out by hand for a 16x16 input.
    pads = {"conv1": (0, 1, 0, 1), "conv2": (1, 1, 1, 1), "conv3": (1, 2, 1, 2), "conv4": (0, 0, 0, 0)}
    seen = capture_inputs(model, x, list(pads))
    for name, pad in pads.items():
        conv = model.get_submodule(name)
        assert type(conv) is Conv2dSame and conv.padding == (0, 0)
        inp = seen[name]
        with torch.no_grad():
            expected = F.conv2d(F.pad(inp, pad), conv.weight, conv.bias, conv.stride, 0, conv.dilation, conv.groups)
            out = conv(inp)
        torch.testing.assert_close(out, expected, rtol=0, atol=0)
        assert out.shape[-1] == -(-inp.shape[-1] // conv.stride[0])  # ceil(size / stride)
    assert model.conv2.groups == 16 == model.conv2.in_channels and model.conv1.stride == (2, 2)
    with torch.no_grad():  # stride 1, odd kernel: same as PyTorch's padding="same"
        expected = F.conv2d(seen["conv2"], model.conv2.weight, None, 1, "same", 1, 16)
        torch.testing.assert_close(model.conv2(seen["conv2"]), expected)
    assert type(model.fc) is FunctionalLinear and isinstance(model.fc, nn.Linear)
    assert isinstance(model.bn_fc, nn.BatchNorm1d)


# -- negatives --------------------------------------------------------------------------------------------------------
def test_std_conv_absorbs_weight_scaling_so_naive_fold_is_wrong(built):
    model = built["reparam_negatives_tiny"]
    conv, bn = model.std_conv, model.bn_a
    assert type(conv) is StdConv2d
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    s = torch.linspace(0.5, 2.0, conv.out_channels).view(-1, 1, 1, 1)
    scaled = StdConv2d(3, 16, 3, stride=2, padding=1).eval()
    plain = nn.Conv2d(3, 16, 3, stride=2, padding=1, bias=False).eval()
    with torch.no_grad():
        scaled.weight.copy_(conv.weight * s)
        out = conv(x)
        # Standardisation undoes the scale: output unchanged, not s * output.
        torch.testing.assert_close(scaled(x), out, atol=1e-2, rtol=1e-2)  # up to eps
        assert (scaled(x) - s.view(1, -1, 1, 1) * out).abs().max() > 0.1
        # The usual conv-then-BN fold, applied to std_conv, does not reproduce bn_a(std_conv(x)) ...
        factor = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        shift = bn.bias - bn.running_mean * factor
        folded = StdConv2d(3, 16, 3, stride=2, padding=1, bias=True).eval()
        folded.weight.copy_(conv.weight * factor.view(-1, 1, 1, 1))
        folded.bias.copy_(shift)
        assert (folded(x) - bn(out)).abs().max() > 0.1
        # ... while the same fold is exact for a plain conv with that weight.
        plain.weight.copy_(conv.weight)
        plain_folded = nn.Conv2d(3, 16, 3, stride=2, padding=1).eval()
        plain_folded.weight.copy_(conv.weight * factor.view(-1, 1, 1, 1))
        plain_folded.bias.copy_(shift)
        torch.testing.assert_close(plain_folded(x), bn(plain(x)), atol=1e-5, rtol=1e-5)


def test_negative_structures(built):
    model = built["reparam_negatives_tiny"]
    graph = torch.fx.symbolic_trace(model).graph
    nodes = {n.target: n for n in graph.nodes if n.op == "call_module"}
    # (b) conv_b1's output feeds the cat and the residual add.
    users_b1 = {u.target for u in nodes["conv_b1"].users}
    assert users_b1 == {torch.cat, operator.add}
    assert [a.target for a in next(iter(nodes["bn_b"].args)).args[0]] == ["conv_b1", "conv_b2"]
    # (c) same input, same output shape, different strides. (d) same input/stride/shape, different dilation.
    seen = capture_inputs(model, example("reparam_negatives_tiny"), ["conv_c1", "conv_c2", "conv_d1", "conv_d2"])
    assert seen["conv_c1"] is seen["conv_c2"] and seen["conv_d1"] is seen["conv_d2"]
    with torch.no_grad():
        c1, c2 = model.conv_c1(seen["conv_c1"]), model.conv_c2(seen["conv_c2"])
        d1, d2 = model.conv_d1(seen["conv_d1"]), model.conv_d2(seen["conv_d2"])
    assert c1.shape == c2.shape == (2, 32, 4, 4) and model.conv_c1.stride != model.conv_c2.stride
    assert d1.shape == d2.shape == seen["conv_d1"].shape and model.conv_d1.stride == model.conv_d2.stride
    assert model.conv_d1.kernel_size == model.conv_d2.kernel_size and model.conv_d1.dilation != model.conv_d2.dilation
