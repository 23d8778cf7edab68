"""Issue 9, torch side: the structural folds (branch merging, a BN after a Concat or an Add, conv/linear
subclasses that call F.conv2d / F.linear themselves).

Every number is checked against a reference that shares no code with bnfold: the unfolded eval model run in
float64 (``copy.deepcopy(model).double()``), or, for :func:`bnfold.fold.math.merge_branches`, the branches summed
with ``F.conv*d`` and ``F.batch_norm`` in float64. Errors are relative to the output's scale (max |reference|).
What a folded model still runs is counted at the aten level (a dispatch mode), so it holds for an
``nn.Module``, an ``fx.GraphModule`` and a ``torch.export`` program alike.
"""

from __future__ import annotations

import copy
import io
import json
import math
import warnings
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import fx, nn
from torch.utils._python_dispatch import TorchDispatchMode

import bnfold
from bnfold.fold.math import BNParams, BranchTensors, merge_branches

#: fp32 folded model vs the float64 unfolded model, relative to the output's scale (observed: ~2e-7).
RTOL_FP32 = 2e-5
#: float64 folded model vs the float64 unfolded model (observed: ~5e-16).
RTOL_FP64 = 1e-12
FORMS = ("fx", "export")


# -- helpers ------------------------------------------------------------------------------------------------------------
def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Seeded, non-trivial BN statistics (gamma of both signs) and conv/linear biases; eval mode."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                n = module.num_features
                module.running_mean.copy_(torch.randn(n, generator=gen) * 0.5)
                module.running_var.copy_(torch.rand(n, generator=gen) * 1.5 + 0.5)
                if module.weight is not None:
                    sign = torch.where(torch.rand(n, generator=gen) < 0.2, -1.0, 1.0)
                    module.weight.copy_((torch.rand(n, generator=gen) + 0.5) * sign)
                    module.bias.copy_(torch.randn(n, generator=gen) * 0.3)
            elif isinstance(module, (nn.Conv1d, nn.Conv2d, nn.ConvTranspose2d, nn.Linear)) and module.bias is not None:
                module.bias.copy_(torch.randn(module.bias.shape, generator=gen) * 0.3)
    return model.eval()


def example(shape: tuple[int, ...], seed: int = 1, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def flat(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for v in out.values() for t in flat(v)]
    return [t for v in out for t in flat(v)]


def reference(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """The unfolded eval model in float64: the independent reference."""
    with torch.no_grad():
        return flat(copy.deepcopy(model).double().eval()(x.double()))


def runnable(result: bnfold.FuseResult) -> Callable[..., Any]:
    model = result.model
    return model.module() if isinstance(model, torch.export.ExportedProgram) else model


def rel_error(got: Any, ref: list[torch.Tensor]) -> float:
    got = [g.detach() for g in flat(got)]
    assert len(got) == len(ref)
    worst = 0.0
    for g, r in zip(got, ref):
        assert g.shape == r.shape
        scale = float(r.abs().max()) or 1.0
        worst = max(worst, float((g.double() - r).abs().max()) / scale)
    return worst


class _CountOps(TorchDispatchMode):
    """Counts the aten ops a forward pass runs (after CompositeImplicit decompositions)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def ops_run(fn: Callable[..., Any], x: torch.Tensor) -> tuple[int, int]:
    """(convolutions, batch norms) one forward pass of ``fn`` runs."""
    with torch.no_grad(), _CountOps() as counter:
        fn(x)
    convs = sum(n for op, n in counter.ops.items() if "convolution" in op)
    bns = sum(n for op, n in counter.ops.items() if "batch_norm" in op)
    return convs, bns


def bn_modules(model: Any) -> int:
    if not isinstance(model, nn.Module):
        return 0
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def export(model: nn.Module, x: torch.Tensor) -> torch.export.ExportedProgram:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.export.export(model, (x,))


def fuse(model: nn.Module, x: torch.Tensor, form: str, **kwargs: Any) -> bnfold.FuseResult:
    subject = model if form == "fx" else export(model, x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return bnfold.fuse(subject, (x,), **kwargs)


def positions(result: bnfold.FuseResult) -> dict[str, int]:
    return dict(Counter(f.position for f in result.folded))


def reasons(result: bnfold.FuseResult) -> dict[str, str]:
    return {s.bn: s.reason for s in result.skipped}


# -- building blocks, written the way RepVGG / MobileOne / timm write them ------------------------------------------
def conv_bn(cin: int, cout: int, k: Any, stride: int = 1, padding: Any = 0, groups: int = 1, dilation: int = 1,
            bias: bool = False, conv: type = nn.Conv2d, bn: type = nn.BatchNorm2d, **extra: Any) -> nn.Sequential:
    return nn.Sequential(OrderedDict(
        conv=conv(cin, cout, k, stride=stride, padding=padding, dilation=dilation, groups=groups, bias=bias, **extra),
        bn=bn(cout)))


class RepVGGBlock(nn.Module):
    """relu(3x3 conv+BN + 1x1 conv+BN + identity BN); the identity only for stride 1 and in == out (else ``0``)."""

    def __init__(self, cin: int, cout: int, stride: int = 1, groups: int = 1) -> None:
        super().__init__()
        self.rbr_identity = nn.BatchNorm2d(cin) if cin == cout and stride == 1 else None
        self.rbr_dense = conv_bn(cin, cout, 3, stride, 1, groups)
        self.rbr_1x1 = conv_bn(cin, cout, 1, stride, 0, groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        id_out = 0 if self.rbr_identity is None else self.rbr_identity(x)
        return torch.relu(self.rbr_dense(x) + self.rbr_1x1(x) + id_out)


class MobileOneBlock(nn.Module):
    """act(skip BN + 1x1 scale conv+BN + k conv+BN branches), the branches added with ``out += branch(x)``."""

    def __init__(self, cin: int, cout: int, k: int, padding: int = 0, groups: int = 1, branches: int = 3) -> None:
        super().__init__()
        self.rbr_skip = nn.BatchNorm2d(cin) if cin == cout else None
        self.rbr_conv = nn.ModuleList([conv_bn(cin, cout, k, 1, padding, groups) for _ in range(branches)])
        self.rbr_scale = conv_bn(cin, cout, 1, 1, 0, groups) if k > 1 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity_out = 0
        if self.rbr_skip is not None:
            identity_out = self.rbr_skip(x)
        scale_out = 0
        if self.rbr_scale is not None:
            scale_out = self.rbr_scale(x)
        out = scale_out + identity_out
        for branch in self.rbr_conv:
            out += branch(x)
        return torch.relu(out)


class Summed(nn.Module):
    """The sum of named branches (Sequential(conv, bn), a BN, or ``None`` for the input itself), then ``post``."""

    def __init__(self, post: nn.Module | None = None, **branches: nn.Module | None) -> None:
        super().__init__()
        self.names = list(branches)
        for name, branch in branches.items():
            if branch is not None:
                self.add_module(name, branch)
        self.post = post

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = None
        for name in self.names:
            y = getattr(self, name)(x) if hasattr(self, name) else x
            out = y if out is None else out + y
        return out if self.post is None else self.post(out)


class FixedConv(nn.Conv2d):
    """A Conv2d subclass whose forward calls F.conv2d with the module's stored weight (fx-traceable)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class FLinear(nn.Linear):
    """A Linear subclass whose forward calls F.linear itself."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class Conv2dSame(nn.Conv2d):
    """TensorFlow 'SAME' padding computed from the input shape at run time (timm's Conv2dSame): fx cannot trace it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ih, iw = x.shape[-2:]
        pads = []
        for size, k, s, d in zip((iw, ih), self.kernel_size[::-1], self.stride[::-1], self.dilation[::-1]):
            total = max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
            pads += [total // 2, total - total // 2]
        if any(pads):
            x = F.pad(x, pads)
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class StdConv2d(nn.Conv2d):
    """Weight standardisation (timm's StdConv2d): the weight the conv uses is computed in forward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None, training=True, momentum=0.0,
                              eps=1e-6).reshape_as(self.weight)
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class CatConvs(nn.Module):
    """BN(cat([1x1 conv (no bias), grouped ConvTranspose, 3x3 conv (bias)], dim)) -> ReLU."""

    def __init__(self, dim: int = 1) -> None:
        super().__init__()
        self.dim = dim
        self.a = nn.Conv2d(4, 3, 1, bias=False)
        self.t = nn.ConvTranspose2d(4, 4, 3, padding=1, groups=2, bias=False)
        self.b = nn.Conv2d(4, 5, 3, padding=1)
        self.bn = nn.BatchNorm2d(12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn(torch.cat([self.a(x), self.t(x), self.b(x)], self.dim)))


class CatBlocks(nn.Module):
    """BN after a Concat of two RepVGG-style sums: each merges, then each takes its slice of the BN."""

    def __init__(self) -> None:
        super().__init__()
        self.left = Summed(d=conv_bn(4, 4, 3, padding=1), o=conv_bn(4, 4, 1), i=nn.BatchNorm2d(4))
        self.right = Summed(d=conv_bn(4, 4, 3, padding=1), o=conv_bn(4, 4, 1), i=nn.BatchNorm2d(4))
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(torch.cat([self.left(x), self.right(x)], 1))


class CatLinear(nn.Module):
    """BatchNorm1d after a concat of two Linears' rank-2 outputs (one without bias)."""

    def __init__(self) -> None:
        super().__init__()
        self.fa, self.fb, self.bn = nn.Linear(4, 3, bias=False), nn.Linear(4, 5), nn.BatchNorm1d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = x.mean((2, 3))
        return self.bn(torch.cat([self.fa(v), self.fb(v)], -1))


class AddTwoInputs(nn.Module):
    """BN(conv_a(x) + conv_b(pool(x))): bias-less stride-2 3x3 and a 1x1 with bias reading different tensors."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_a = nn.Conv2d(4, 6, 3, stride=2, padding=1, bias=False)
        self.pool = nn.AvgPool2d(2)
        self.conv_b = nn.Conv2d(4, 6, 1)
        self.bn = nn.BatchNorm2d(6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn(self.conv_a(x) + self.conv_b(self.pool(x))))


class AddLinear(nn.Module):
    """BatchNorm1d after the sum of two bias-less Linears reading different tensors."""

    def __init__(self) -> None:
        super().__init__()
        self.fa, self.fb, self.bn = nn.Linear(4, 5, bias=False), nn.Linear(4, 5, bias=False), nn.BatchNorm1d(5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = x.mean((2, 3))
        return self.bn(self.fa(v) + self.fb(v.flip(1)))


class SubclassLayers(nn.Module):
    """Conv2d / Linear subclasses calling F.conv2d / F.linear with their stored weights, each -> BN."""

    def __init__(self, conv: type = FixedConv, bias: bool = True) -> None:
        super().__init__()
        padding = {} if conv is Conv2dSame else {"padding": 1}
        self.conv, self.bn = conv(4, 6, 3, stride=2, bias=bias, **padding), nn.BatchNorm2d(6)
        self.fc, self.bn_fc = FLinear(6, 5), nn.BatchNorm1d(5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.conv(x)))
        return self.bn_fc(self.fc(x.mean((2, 3))))


class PreBN(nn.Module):
    """BN -> a pointwise (1x1, unpadded) re-parameterisable block: the BN folds *before* the merged conv."""

    def __init__(self, plain_identity: bool = False) -> None:
        super().__init__()
        self.pre = nn.BatchNorm2d(4)
        ident = None if plain_identity else nn.BatchNorm2d(4)
        self.block = Summed(a=conv_bn(4, 4, 1), b=conv_bn(4, 4, 1), i=ident)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(self.pre(x))


class Conv1dBlock(nn.Module):
    """A RepVGG block in one spatial dimension (5-tap conv with bias, 1-tap conv, identity BN)."""

    def __init__(self) -> None:
        super().__init__()
        self.block = Summed(d=conv_bn(4, 4, 5, padding=2, bias=True, conv=nn.Conv1d, bn=nn.BatchNorm1d),
                            o=conv_bn(4, 4, 1, conv=nn.Conv1d, bn=nn.BatchNorm1d), i=nn.BatchNorm1d(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x.flatten(2))


# -- merge_branches against F.conv / F.batch_norm in float64 ------------------------------------------------------------
def _conv(dims: int):
    return {1: F.conv1d, 2: F.conv2d}[dims]


@st.composite
def branch_sets(draw):
    """A random re-parameterisable block: its branches, geometry and a seed for the tensors."""
    dims = draw(st.sampled_from([1, 2]))
    channels = draw(st.sampled_from([2, 4]))
    groups = draw(st.sampled_from([1, 2, channels]))
    kinds = draw(st.lists(st.sampled_from(["conv_bn", "conv", "bn", "identity"]), min_size=2, max_size=5))
    if not any(k.startswith("conv") for k in kinds):
        kinds[0] = "conv_bn"
    has_identity = any(k in ("bn", "identity") for k in kinds)
    stride = 1 if has_identity else draw(st.sampled_from([1, 2]))
    out = channels if has_identity else channels * draw(st.sampled_from([1, 2]))
    dilation = draw(st.sampled_from([1, 2]))
    kernels = [tuple(draw(st.sampled_from([1, 3, 5])) for _ in range(dims)) if k.startswith("conv") else None
               for k in kinds]
    biases = [draw(st.booleans()) if k.startswith("conv") else False for k in kinds]
    affine = [draw(st.booleans()) for _ in kinds]
    seed = draw(st.integers(0, 2**31 - 1))
    return {"dims": dims, "channels": channels, "groups": groups, "kinds": kinds, "stride": stride, "out": out,
            "dilation": dilation, "kernels": kernels, "biases": biases, "affine": affine, "seed": seed}


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(branch_sets())
def test_merge_branches_equals_the_sum_of_branches(spec):
    gen = torch.Generator().manual_seed(spec["seed"])
    dims, cin, out, groups = spec["dims"], spec["channels"], spec["out"], spec["groups"]
    stride, dilation = spec["stride"], spec["dilation"]
    big = tuple(max([k[d] for k in spec["kernels"] if k] + [1]) for d in range(dims))
    x = torch.randn((2, cin) + (7,) * dims, generator=gen, dtype=torch.float64)
    conv = _conv(dims)
    expected = 0
    branches = []
    for kind, kernel, bias, affine in zip(spec["kinds"], spec["kernels"], spec["biases"], spec["affine"]):
        weight = b = bn = None
        if kernel is not None:
            weight = torch.randn((out, cin // groups) + kernel, generator=gen, dtype=torch.float64)
            b = torch.randn(out, generator=gen, dtype=torch.float64) if bias else None
            padding = tuple(dilation * (k - 1) // 2 for k in kernel)
            y = conv(x, weight, b, stride, padding, dilation, groups)
        else:
            y = x
        if kind in ("conv_bn", "bn"):
            n = y.shape[1]
            mean = torch.randn(n, generator=gen, dtype=torch.float64)
            var = 10 ** (torch.rand(n, generator=gen, dtype=torch.float64) * 3 - 2)  # 0.01 .. 10
            gamma = torch.randn(n, generator=gen, dtype=torch.float64) if affine else None
            beta = torch.randn(n, generator=gen, dtype=torch.float64) if affine else None
            eps = 1e-3
            y = F.batch_norm(y, mean, var, gamma, beta, training=False, eps=eps)
            bn = BNParams(mean.clone(), var.clone(), eps, gamma, beta)
        expected = expected + y
        offsets = tuple((B - k) // 2 for B, k in zip(big, kernel or (1,) * dims))
        branches.append(BranchTensors(weight, b, bn, offsets))
    weight, bias = merge_branches((out, cin // groups) + big, groups, branches, torch.float64)
    got = conv(x, weight, bias, stride, tuple(dilation * (k - 1) // 2 for k in big), dilation, groups)
    assert got.shape == expected.shape
    scale = float(expected.abs().max())
    assert float((got - expected).abs().max()) <= 1e-12 * scale, spec
    # cast to a storage dtype once: exactly the float64 result rounded
    w32, b32 = merge_branches((out, cin // groups) + big, groups, branches, torch.float32)
    assert w32.dtype == b32.dtype == torch.float32
    assert torch.equal(w32, weight.float()) and torch.equal(b32, bias.float())


def test_merge_branches_refuses_what_cannot_be_one_conv():
    w = torch.randn(4, 2, 3, 3, dtype=torch.float64)
    bn4 = BNParams(torch.zeros(4), torch.ones(4), 1e-5)
    with pytest.raises(ValueError, match="identity"):  # 2 -> 4 channels: no identity kernel
        merge_branches((4, 2, 3, 3), 1, [BranchTensors(w, None, None, (0, 0)), BranchTensors(None, None, None, (1, 1))],
                       torch.float64)
    with pytest.raises(ValueError, match="features"):
        merge_branches((4, 2, 3, 3), 1, [BranchTensors(w, None, BNParams(torch.zeros(3), torch.ones(3), 1e-5), (0, 0))],
                       torch.float64)
    with pytest.raises(ValueError, match="does not fit"):  # a 3x3 kernel placed at offset 1 of a 3x3
        merge_branches((4, 2, 3, 3), 1, [BranchTensors(w, None, bn4, (1, 1))], torch.float64)
    with pytest.raises(ValueError, match="does not merge"):  # channel counts differ
        merge_branches((4, 4, 3, 3), 1, [BranchTensors(w, None, bn4, (0, 0))], torch.float64)


X4 = (2, 4, 6, 6)


@dataclass
class Case:
    make: Callable[[], nn.Module]
    positions: dict[str, int]  # expected Counter of Fold.position
    convs: tuple[int, int]  # convolutions run by the unfolded / folded model
    forms: tuple[str, ...] = FORMS  # (some structures only on fx, to keep the file fast)
    bns_left: dict[str, int] = field(default_factory=lambda: {"fx": 0, "export": 0})  # batch norms still run
    shape: tuple[int, ...] = X4
    discovery: dict[str, str] = field(default_factory=lambda: {"fx": "fx", "export": "export"})


FX = ("fx",)


POSITIVE = {
    "repvgg": Case(lambda: RepVGGBlock(4, 4), {"merge": 3}, (2, 1)),
    "repvgg_no_identity_stride2": Case(lambda: RepVGGBlock(4, 8, stride=2), {"merge": 2}, (2, 1)),
    "repvgg_groups2": Case(lambda: RepVGGBlock(4, 4, groups=2), {"merge": 3}, (2, 1), FX),
    "repvgg_depthwise": Case(lambda: RepVGGBlock(4, 4, groups=4), {"merge": 3}, (2, 1), FX),
    "mobileone_depthwise": Case(lambda: MobileOneBlock(4, 4, 3, padding=1, groups=4), {"merge": 5}, (4, 1)),
    "mobileone_pointwise_from_int_zero": Case(lambda: MobileOneBlock(4, 8, 1), {"merge": 3}, (3, 1)),
    "acnet_asymmetric_kernels": Case(lambda: Summed(d=conv_bn(4, 4, 3, padding=1), h=conv_bn(4, 4, (1, 3), padding=(0, 1)),
                                                    v=conv_bn(4, 4, (3, 1), padding=(1, 0))), {"merge": 3}, (3, 1), FX),
    "merge_then_bn": Case(lambda: Summed(post=nn.BatchNorm2d(4), d=conv_bn(4, 4, 3, padding=1), o=conv_bn(4, 4, 1),
                                         i=nn.BatchNorm2d(4)), {"merge": 3, "after": 1}, (2, 1)),
    "plain_x_identity": Case(lambda: Summed(d=conv_bn(4, 4, 3, padding=1, bias=True), o=conv_bn(4, 4, 1), x=None),
                             {"merge": 2}, (2, 1)),
    "dilated": Case(lambda: Summed(d=conv_bn(4, 4, 3, padding=2, dilation=2), o=conv_bn(4, 4, 1, dilation=2),
                                   i=nn.BatchNorm2d(4)), {"merge": 3}, (2, 1), FX),
    "bn_before_pointwise_block": Case(PreBN, {"merge": 3, "before": 1}, (2, 1)),
    "bn_before_block_with_plain_x": Case(lambda: PreBN(plain_identity=True), {"merge": 2, "before": 1}, (2, 1), FX),
    "subclass_branches": Case(lambda: Summed(d=nn.Sequential(FixedConv(4, 4, 3, padding=1, bias=False),
                                                             nn.BatchNorm2d(4)),
                                             o=nn.Sequential(FixedConv(4, 4, 1, bias=False), nn.BatchNorm2d(4)),
                                             i=nn.BatchNorm2d(4)), {"merge": 3}, (2, 1)),
    "conv1d": Case(Conv1dBlock, {"merge": 3}, (2, 1), FX),
    "concat_convs": Case(CatConvs, {"concat": 1}, (3, 3)),
    "concat_negative_axis": Case(lambda: CatConvs(dim=-3), {"concat": 1}, (3, 3), FX),
    "concat_of_merged_blocks": Case(CatBlocks, {"merge": 6, "concat": 1}, (4, 2)),
    "concat_linear_rank2": Case(CatLinear, {"concat": 1}, (0, 0)),
    "add_two_convs_other_inputs": Case(AddTwoInputs, {"add": 1}, (2, 2)),
    "add_two_linears_bn1d": Case(AddLinear, {"add": 1}, (0, 0)),
    "subclass_layers": Case(SubclassLayers, {"after": 2}, (1, 1)),
    # A functional conv without a bias: the traced graph (fx), the program (export) or, without a graph (observed
    # discovery, Conv2dSame), the module gets a bias for the shift, and the BN goes.
    "subclass_conv_without_bias": Case(lambda: SubclassLayers(bias=False), {"after": 2}, (1, 1)),
    "conv2d_same_untraceable": Case(lambda: SubclassLayers(conv=Conv2dSame, bias=False), {"after": 2}, (1, 1),
                                    discovery={"fx": "observed", "export": "export"}),
}


@pytest.fixture(scope="module")
def built():
    """One seeded model (eval, random statistics) and input per case name, shared by every test here."""
    cache: dict[str, tuple[nn.Module, torch.Tensor]] = {}

    def get(name: str, make: Callable[[], nn.Module], shape: tuple[int, ...]) -> tuple[nn.Module, torch.Tensor]:
        if name not in cache:
            torch.manual_seed(0)
            model = randomize(make())
            cache[name] = (model, example(shape))
        return cache[name]

    return get


@pytest.fixture(scope="module")
def snapshots() -> dict:
    """(case, form) -> (what fuse was handed, its class, a copy of its state dict and its graph), taken before."""
    return {}


@pytest.fixture(scope="module")
def fused(built, snapshots):
    """``bnfold.fuse`` of each (case, form), computed once."""
    cache: dict[tuple[str, str], tuple[nn.Module, torch.Tensor, bnfold.FuseResult]] = {}

    def get(name: str, form: str, table: dict | None = None) -> tuple[nn.Module, torch.Tensor, bnfold.FuseResult]:
        if (name, form) not in cache:
            case = (table or POSITIVE)[name]
            model, x = built(name, case.make, case.shape)
            subject = model if form == "fx" else export(model, x)
            state = subject.state_dict() if form == "fx" else subject.state_dict
            graph = None if form == "fx" else str(subject.graph_module.graph)
            snapshots[name, form] = (subject, type(subject), {k: v.clone() for k, v in state.items()}, graph)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                cache[name, form] = (model, x, bnfold.fuse(subject, (x,)))
        return cache[name, form]

    return get


# -- the rules on small modules, fx and torch.export ----------------------------------------------------------------------
POSITIVE_RUNS = [(name, form) for name, case in POSITIVE.items() for form in case.forms]


@pytest.mark.parametrize(("name", "form"), POSITIVE_RUNS)
def test_structural_fold_parity_and_positions(fused, name, form):
    case = POSITIVE[name]
    model, x, result = fused(name, form)
    assert result.ok, result.to_dict()
    assert result.discovery == case.discovery[form]
    assert rel_error(runnable(result)(x), reference(model, x)) < RTOL_FP32
    assert positions(result) == case.positions, (result.folded, result.skipped)
    assert result.skipped == []
    if "merge" in case.positions:
        for fold in result.folded:
            if fold.position == "merge":
                assert fold.merge is not None and fold.layer == fold.merge.target
                assert len(fold.merge.branches) >= 2


@pytest.mark.parametrize(("name", "form"), POSITIVE_RUNS)
def test_structural_fold_runs_fewer_ops(fused, name, form):
    """What the folded model still runs: no batch norm where a rule applies, one conv per merged block."""
    case = POSITIVE[name]
    model, x, result = fused(name, form)
    before = ops_run(model, x)
    assert before[0] == case.convs[0] and before[1] > 0
    assert ops_run(runnable(result), x) == (case.convs[1], case.bns_left[form])
    assert bn_modules(result.model) == (case.bns_left[form] if form == "fx" else 0)
    if "merge" in case.positions and form == "fx":
        assert isinstance(result.model, fx.GraphModule)


@pytest.mark.parametrize("name", ["mobileone_depthwise", "acnet_asymmetric_kernels", "concat_of_merged_blocks",
                                  "add_two_convs_other_inputs"])
def test_float64_models_fold_exactly(built, name):
    """In float64 nothing is rounded to fp32, so the folded model matches the unfolded one to ~1e-15."""
    case = POSITIVE[name]
    model, x = built(name, case.make, case.shape)
    model64, x64 = copy.deepcopy(model).double(), x.double()
    result = fuse(model64, x64, "fx")
    assert result.ok and positions(result) == case.positions
    assert rel_error(runnable(result)(x64), reference(model, x)) < RTOL_FP64


def test_merge_layout_and_parts(fused):
    """Which conv a merge writes, and which channels each part of a Concat / Add absorbs."""
    _, _, result = fused("repvgg", "fx")
    merges = {f.merge for f in result.folded}
    assert len(merges) == 1
    merge = merges.pop()
    assert merge.target.name == "rbr_dense.conv"
    assert {(b.layer.name if b.layer else None, b.bn.name if b.bn else None) for b in merge.branches} == {
        ("rbr_dense.conv", "rbr_dense.bn"), ("rbr_1x1.conv", "rbr_1x1.bn"), (None, "rbr_identity")}
    offsets = {b.bn.name: b.offsets for b in merge.branches}
    assert offsets == {"rbr_dense.bn": (0, 0), "rbr_1x1.bn": (1, 1), "rbr_identity": (1, 1)}

    _, _, result = fused("concat_convs", "fx")
    (fold,) = result.folded
    assert [(p.layer.name, p.channels) for p in fold.parts] == [("a", (0, 3)), ("t", (3, 7)), ("b", (7, 12))]

    for form in FORMS:
        _, _, result = fused("add_two_convs_other_inputs", form)
        (fold,) = result.folded
        assert {p.layer.name for p in fold.parts} == {"conv_a", "conv_b"}
        assert sum(p.shift for p in fold.parts) == 1 and all(p.channels is None for p in fold.parts)


# -- negatives: each with the reason checked ------------------------------------------------------------------------------
class ConvOutputUsed(nn.Module):
    """A RepVGG block whose dense conv output is also returned: that branch cannot be merged away."""

    def __init__(self) -> None:
        super().__init__()
        self.d, self.o, self.i = conv_bn(4, 4, 3, padding=1), conv_bn(4, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor):
        a = self.d.conv(x)
        return self.d.bn(a) + self.o(x) + self.i(x), a


class SharedBN(nn.Module):
    """One BN module on a branch of the block and again outside it (runs twice per forward)."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c3 = nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.Conv2d(4, 4, 1, bias=False)
        self.bn, self.o, self.i = nn.BatchNorm2d(4), conv_bn(4, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor):
        return self.bn(self.c1(x)) + self.o(x) + self.i(x), self.bn(self.c3(x))


class SharedConv(nn.Module):
    """One conv module on two branches of the block and again outside it (runs three times per forward)."""

    def __init__(self) -> None:
        super().__init__()
        self.c, self.b1, self.b2, self.i = nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), \
            nn.BatchNorm2d(4), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor):
        return self.b1(self.c(x)) + self.b2(self.c(x)) + self.i(x), self.c(x.flip(-1))


class CatOperandUsed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.bn = nn.Conv2d(4, 3, 1), nn.Conv2d(4, 5, 1), nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor):
        ya = self.a(x)
        return self.bn(torch.cat([ya, self.b(x)], 1)), ya


class CatAxis2(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.bn = nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor):
        return self.bn(torch.cat([self.a(x), self.b(x)], 2))


class CatNonConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.bn = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor):
        return self.bn(torch.cat([self.a(x), torch.relu(x)], 1))


class AddConstant(nn.Module):
    """BN(conv(x) + 1.5), and a RepVGG-like sum with a constant operand."""

    def __init__(self) -> None:
        super().__init__()
        self.c, self.bn = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)
        self.d, self.i = conv_bn(4, 4, 3, padding=1), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor):
        return self.bn(self.c(x) + 1.5), self.d(x) + self.i(x) + 1.5


class AddOperandUsed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.bn = nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor):
        ya = self.a(x)
        return self.bn(ya + self.b(x.flip(-1))), ya


class AddChannelBroadcast(nn.Module):
    """BN(conv 4->4 + conv 4->1): the second operand is broadcast across channels."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.bn = nn.Conv2d(4, 4, 1), nn.Conv2d(4, 1, 3, padding=1), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor):
        return self.bn(self.a(x) + self.b(x.flip(-1)))


class IdentityBroadcast(nn.Module):
    """A 1-channel input summed with 1 -> 4 convs: the identity BN broadcasts, there is no identity kernel."""

    def __init__(self) -> None:
        super().__init__()
        self.block = Summed(d=conv_bn(1, 4, 3, padding=1), o=conv_bn(1, 4, 1), i=nn.BatchNorm2d(1))

    def forward(self, x: torch.Tensor):
        return self.block(x[:, :1])


@dataclass
class Negative:
    make: Callable[[], nn.Module]
    positions: dict[str, int]
    reasons: dict[str, tuple[str, ...]]  # BN -> substrings of its skip reason (both forms)
    forms: tuple[str, ...] = FORMS
    shape: tuple[int, ...] = X4


NEGATIVE = {
    # branches that cannot become one conv: every conv+BN still folds into its own conv; the identity BN says why
    "different_strides": Negative(lambda: Summed(d=conv_bn(4, 4, 3, 1, 1), o=conv_bn(4, 4, 1, 2, 3), i=nn.BatchNorm2d(4)),
                                  {"after": 2}, {"i": ("cannot merge", "stride")}),
    "different_dilations": Negative(lambda: Summed(d=conv_bn(4, 4, 3, padding=1), o=conv_bn(4, 4, 3, padding=2, dilation=2),
                                                   i=nn.BatchNorm2d(4)), {"after": 2}, {"i": ("cannot merge", "dilation")},
                                    FX),
    "different_groups": Negative(lambda: Summed(d=conv_bn(4, 4, 3, padding=1, groups=2), o=conv_bn(4, 4, 1),
                                                i=nn.BatchNorm2d(4)), {"after": 2}, {"i": ("cannot merge", "groups")}, FX),
    # (torch.export writes the reflection as its own pad op: there the conv reads another tensor; see below)
    "reflect_padding": Negative(lambda: Summed(d=conv_bn(4, 4, 3, padding=1, padding_mode="reflect"), o=conv_bn(4, 4, 1),
                                               i=nn.BatchNorm2d(4)), {"after": 2}, {"i": ("cannot merge", "reflect")}, FX),
    "conv_transpose_branch": Negative(lambda: Summed(d=conv_bn(4, 4, 3, padding=1, conv=nn.ConvTranspose2d),
                                                     o=conv_bn(4, 4, 1), i=nn.BatchNorm2d(4)), {"after": 2},
                                      {"i": ("cannot merge", "conv_transpose")}, FX),
    # (the whole sum cannot merge; the sum of the two convs inside it does)
    "identity_broadcast_channels": Negative(IdentityBroadcast, {"merge": 2},
                                            {"block.i": ("cannot merge", "as many input as output channels")}, FX),
    "branch_conv_output_used_elsewhere": Negative(ConvOutputUsed, {"after": 1},
                                                  {"d.bn": ("also feeds",), "i": ("cannot merge",)}),
    "shared_bn_on_branch": Negative(SharedBN, {"after": 1}, {"bn": ("runs 2 times",), "i": ("cannot merge",)}, FX),
    "shared_conv_on_branches": Negative(SharedConv, {}, {"b1": ("runs 3 times",), "b2": ("runs 3 times",), "i": ()},
                                        FX),
    # BN(conv(x) + 1.5) is refused; in (d(x) + i(x)) + 1.5 the sum inside the constant's Add merges on its own
    "constant_operand": Negative(AddConstant, {"merge": 2}, {"bn": ("constant",)}),
    # BN after a Concat / an Add that must not be split
    "concat_operand_used_elsewhere": Negative(CatOperandUsed, {}, {"bn": ("Concat", "also used elsewhere")}),
    "concat_axis_2": Negative(CatAxis2, {}, {"bn": ("axis 2", "not the channel axis")}),
    "concat_non_conv_operand": Negative(CatNonConv, {}, {"bn": ("Concat", "relu", "not a layer")}),
    "add_operand_used_elsewhere": Negative(AddOperandUsed, {}, {"bn": ("Add", "also used elsewhere")}),
    "add_broadcast_across_channels": Negative(AddChannelBroadcast, {}, {"bn": ("broadcast across channels",)}),
}


@pytest.mark.parametrize(("name", "form"), [(n, f) for n, neg in NEGATIVE.items() for f in neg.forms])
def test_negative_is_refused_with_reason(fused, name, form):
    neg = NEGATIVE[name]
    model, x, result = fused(name, form, NEGATIVE)
    assert result.ok, result.to_dict()
    assert rel_error(runnable(result)(x), reference(model, x)) < RTOL_FP32
    assert positions(result) == neg.positions, (result.folded, result.skipped)
    why = reasons(result)
    for bn, needles in neg.reasons.items():
        assert bn in why, (bn, why)
        for needle in needles:
            assert needle.lower() in why[bn].lower(), (bn, why[bn])
    assert {f.bn.name for f in result.folded}.isdisjoint(neg.reasons)


@pytest.mark.parametrize("name", ["shared_bn_on_branch", "shared_conv_on_branches", "reflect_padding"])
def test_negatives_keep_parity_in_torch_export(fused, name):
    """The same blocks as torch.export programs: whatever is folded, the program still matches."""
    model, x, result = fused(name, "export", NEGATIVE)
    assert result.ok, result.to_dict()
    assert rel_error(runnable(result)(x), reference(model, x)) < RTOL_FP32


def test_keep_structure_merges_nothing(built):
    """keep_structure=True: no merge (it would change the architecture), the class and every state-dict key kept."""
    case = POSITIVE["repvgg"]
    model, x = built("repvgg", case.make, case.shape)
    result = fuse(model, x, "fx", keep_structure=True)
    assert result.ok
    assert type(result.model) is RepVGGBlock
    assert list(result.model.state_dict()) == list(model.state_dict())
    assert positions(result) == {"after": 2}
    assert "rbr_identity" in reasons(result)
    assert rel_error(result.model(x), reference(model, x)) < RTOL_FP32
    assert ops_run(result.model, x)[0] == 2  # both convs still run


def test_weight_standardised_conv_keeps_its_bn():
    torch.manual_seed(0)
    model = randomize(nn.Sequential(OrderedDict(conv=StdConv2d(4, 6, 3, padding=1, bias=False), bn=nn.BatchNorm2d(6))))
    x = example(X4)
    ref = reference(model, x)
    # A naive fold (scale the stored weight, move the shift into a bias) is wrong: the forward standardises the
    # weight again, so the per-channel scale disappears.
    bn = model.bn
    s = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).detach().double()
    t = bn.bias.detach().double() - s * bn.running_mean.double()
    naive = copy.deepcopy(model.conv).double()
    with torch.no_grad():
        naive.weight.mul_(s.view(-1, 1, 1, 1))
        naive.bias = nn.Parameter(t.clone())
        assert rel_error(naive(x.double()), ref) > 0.05
    for form in FORMS:
        result = fuse(model, x, form)
        assert result.ok and result.folded == []
        why = reasons(result)["bn"]
        assert "computed in forward" in why and "weight" in why, why
        assert rel_error(runnable(result)(x), ref) < RTOL_FP32
        assert ops_run(runnable(result), x)[1] == 2  # the standardisation and the BN


# -- reporting ----------------------------------------------------------------------------------------------------------
def test_to_dict_and_describe(fused):
    _, _, result = fused("merge_then_bn", "fx")
    document = json.loads(json.dumps(result.to_dict()))
    merged = [f for f in document["folded"] if f["position"] == "merge"]
    assert len(merged) == 3
    for entry in merged:
        assert entry["layer"] == "d.conv" and entry["merge"]["into"] == "d.conv"
        assert {(b["layer"], b["bn"]) for b in entry["merge"]["branches"]} == {
            ("d.conv", "d.bn"), ("o.conv", "o.bn"), (None, "i")}
    (after,) = [f for f in document["folded"] if f["position"] == "after"]
    assert after == {"bn": "post", "layer": "d.conv", "layer_kind": "conv", "position": "after"}
    assert {f.describe() for f in result.folded if f.merge} == {"merged 3 branches into d.conv"}

    _, _, result = fused("concat_convs", "export")
    document = json.loads(json.dumps(result.to_dict()))
    (entry,) = document["folded"]
    assert entry["position"] == "concat"
    assert entry["parts"] == [{"layer": "a", "channels": [0, 3], "shift": True},
                              {"layer": "t", "channels": [3, 7], "shift": True},
                              {"layer": "b", "channels": [7, 12], "shift": True}]
    assert result.folded[0].describe() == "folded into a (Concat slice 0:3), t (Concat slice 3:7), b (Concat slice 7:12)"

    _, _, result = fused("add_two_convs_other_inputs", "fx")
    (entry,) = json.loads(json.dumps(result.to_dict()))["folded"]
    assert entry["position"] == "add"
    assert sorted((p["layer"], p["channels"], p["shift"]) for p in entry["parts"]) == [
        ("conv_a", None, False), ("conv_b", None, True)]
    assert result.folded[0].describe() == "folded into conv_a (scale), conv_b (scale and shift)"


def test_plan_matches_fuse_and_changes_nothing(built):
    case = POSITIVE["merge_then_bn"]
    model, x = built("merge_then_bn", case.make, case.shape)
    before = copy.deepcopy(model.state_dict())
    found = bnfold.plan(model, (x,))
    assert dict(Counter(f.position for f in found.folds)) == case.positions
    assert found.skips == []
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# -- the caller's model, and what the result can do -----------------------------------------------------------------------
@pytest.mark.parametrize(("name", "form"), [(n, f) for n in ("repvgg", "mobileone_depthwise", "concat_convs",
                                                               "add_two_convs_other_inputs", "bn_before_pointwise_block",
                                                               "subclass_conv_without_bias") for f in FORMS])
def test_input_model_is_not_modified(fused, snapshots, name, form):
    """The model (or program) handed to fuse: same class, same state dict, same graph, still in eval mode."""
    model, _, result = fused(name, form)
    assert result.ok and result.folded
    subject, cls, state, graph = snapshots[name, form]
    assert type(subject) is cls
    now = subject.state_dict() if form == "fx" else subject.state_dict
    assert list(now) == list(state)
    assert all(torch.equal(state[k], now[k]) for k in state)
    if form == "fx":
        assert subject is model and not model.training
        assert bn_modules(model) == sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in POSITIVE[name].make().modules())
    else:
        assert str(subject.graph_module.graph) == graph
    assert result.model is not subject


def test_merged_model_is_a_graph_module_that_saves(fused):
    model, x, result = fused("mobileone_depthwise", "fx")
    folded = result.model
    assert isinstance(folded, fx.GraphModule)
    ref = reference(model, x)
    with torch.no_grad():
        expected = folded(x)
        assert rel_error(copy.deepcopy(folded)(x), ref) < RTOL_FP32
        program = export(folded, x)
        torch.testing.assert_close(program.module()(x), expected, rtol=0, atol=1e-6)
        buffer = io.BytesIO()
        torch.save(folded, buffer)
        buffer.seek(0)
        loaded = torch.load(buffer, weights_only=False)
        torch.testing.assert_close(loaded(x), expected, rtol=0, atol=0)
    # only the merged conv is left, with its new bias
    assert sorted(folded.state_dict()) == ["rbr_conv.0.conv.bias", "rbr_conv.0.conv.weight"]


def test_merged_export_program_round_trips(fused):
    model, x, result = fused("repvgg", "export")
    assert isinstance(result.model, torch.export.ExportedProgram)
    buffer = io.BytesIO()
    torch.export.save(result.model, buffer)
    buffer.seek(0)
    loaded = torch.export.load(buffer)
    assert rel_error(loaded.module()(x), reference(model, x)) < RTOL_FP32
    assert ops_run(loaded.module(), x) == (1, 0)


class TwiceIdentity(nn.Module):
    """``d(x) + (y + y)`` with ``y = bn(x)``: one BN node read twice by one sum."""

    def __init__(self) -> None:
        super().__init__()
        self.d, self.i = conv_bn(4, 4, 3, padding=1), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor):
        y = self.i(x)
        return self.d(x) + (y + y)


@pytest.mark.parametrize("form", FORMS)
def test_identity_read_twice(form):
    """Whether or not bnfold merges ``d(x) + (y + y)``, the result matches and each BN is reported once."""
    torch.manual_seed(0)
    model, x = randomize(TwiceIdentity()), example(X4)
    result = fuse(model, x, form)
    assert result.ok
    assert rel_error(runnable(result)(x), reference(model, x)) < RTOL_FP32
    names = [f.bn.name for f in result.folded] + [s.bn for s in result.skipped]
    assert sorted(names) == ["d.bn", "i"], (result.folded, result.skipped)


class LinearExpression(nn.Module):
    """Sums written with Sub, Mul by a constant and nesting (FastViT: ``x + layer_scale * (mixer(x) - norm(x))``)."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.d, self.o, self.i = conv_bn(4, 4, 3, padding=1, groups=4), conv_bn(4, 4, 1, groups=4), nn.BatchNorm2d(4)
        self.scale = nn.Parameter(torch.rand(4, 1, 1) + 0.5)

    def forward(self, x: torch.Tensor):
        if self.how == "fastvit":
            return x + self.scale * (self.d(x) - self.i(x))
        if self.how == "nested":
            return 2.0 * (self.scale * (self.d(x) + self.i(x)) - self.o(x)) - x
        if self.how == "constant_minus":
            return 1.0 - (self.d(x) - self.i(x))
        return x.mean() * self.d(x) + self.i(x)  # "data_factor": a factor computed from the input


@pytest.mark.parametrize(("how", "convs_left", "form"), [("fastvit", 1, "fx"), ("fastvit", 1, "export"),
                                                         ("nested", 1, "fx"), ("constant_minus", None, "export"),
                                                         ("data_factor", None, "fx")])
def test_linear_expressions_keep_parity(how, convs_left, form):
    """Whatever bnfold merges in a sum with Subs and constant factors, the outputs match; the FastViT forms merge."""
    torch.manual_seed(0)
    model, x = randomize(LinearExpression(how)), example(X4)
    result = fuse(model, x, form)
    assert result.ok
    assert rel_error(runnable(result)(x), reference(model, x)) < RTOL_FP32
    if convs_left is not None:
        assert ops_run(runnable(result), x) == (convs_left, 0), (result.folded, result.skipped)
    if how == "data_factor":  # a factor that depends on the input is not a constant: d and i are not merged
        assert "merge" not in positions(result)


# -- shared weights, spellings, and findings (xfail(strict=True) until bnfold changes) -------------------------------------
class TiedMerge(nn.Module):
    """A RepVGG block whose dense conv shares its weight Parameter with another conv (weight tying)."""

    def __init__(self) -> None:
        super().__init__()
        self.d, self.o, self.i = conv_bn(4, 4, 3, padding=1), conv_bn(4, 4, 1), nn.BatchNorm2d(4)
        self.other = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.other.weight = self.d.conv.weight

    def forward(self, x: torch.Tensor):
        return self.d(x) + self.o(x) + self.i(x), self.other(x)


class TiedAfter(nn.Module):
    """conv -> BN where the conv's weight Parameter is also another conv's."""

    def __init__(self) -> None:
        super().__init__()
        self.d, self.other = conv_bn(4, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.other.weight = self.d.conv.weight

    def forward(self, x: torch.Tensor):
        return self.d(x), self.other(x)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("make", [TiedMerge, TiedAfter], ids=["merge", "after"])
def test_tied_weights_are_not_folded_into(make, form):
    """A weight Parameter shared by two convs: writing a fold into it would change the other conv too."""
    torch.manual_seed(0)
    model, x = randomize(make()), example(X4)
    result = fuse(model, x, form)
    assert result.ok
    assert rel_error(runnable(result)(x), reference(model, x)) < RTOL_FP32
    assert "d.bn" in reasons(result) and "tied" in reasons(result)["d.bn"]
    assert all(f.layer.weight not in ("d.conv.weight", "other.weight") for f in result.folded)


class Concatenate(nn.Module):
    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.a, self.b, self.bn = nn.Conv2d(4, 3, 1), nn.Conv2d(4, 5, 1), nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor):
        parts = [self.a(x), self.b(x)]
        if self.how == "concatenate_axis":
            return self.bn(torch.concatenate(parts, axis=1))
        return self.bn(torch.cat(tensors=parts, dim=1))


@pytest.mark.parametrize(("how", "form"), [("concatenate_axis", "fx"), ("concatenate_axis", "export"),
                                           ("cat_keywords", "fx")])
def test_concat_spellings_fold(how, form):
    """torch.concatenate(..., axis=1) and torch.cat(tensors=..., dim=1) are channel Concats too."""
    torch.manual_seed(0)
    model, x = randomize(Concatenate(how)), example(X4)
    result = fuse(model, x, form)
    assert result.ok
    assert positions(result) == {"concat": 1}, result.skipped
    assert rel_error(runnable(result)(x), reference(model, x)) < RTOL_FP32


def test_export_conv_with_string_padding_folds():
    """torch.export writes nn.Conv2d(padding='same') as aten.conv2d.padding: still a conv."""
    torch.manual_seed(0)
    model = randomize(conv_bn(4, 4, 3, padding="same"))
    x = example(X4)
    result = fuse(model, x, "export")
    assert result.ok and positions(result) == {"after": 1}, result.skipped
    assert ops_run(runnable(result), x) == (1, 0)
    assert rel_error(runnable(result)(x), reference(model, x)) < RTOL_FP32


class BiasIgnoringSame(nn.Conv2d):
    """An untraceable conv subclass that passes ``None`` as the bias itself (not ``self.bias``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] > 0:  # data-dependent Python: fx cannot trace it
            x = F.pad(x, [1, 1, 1, 1])
        return F.conv2d(x, self.weight, None, self.stride, 0)


def test_observed_conv_that_ignores_its_bias_attribute_still_folds():
    # Observed discovery gives the functional conv's module a bias for the shift, but forward passes None, not
    # self.bias: that fold changes the outputs, and the BN keeping the shift (z + shift) is tried next.
    torch.manual_seed(0)
    model = randomize(nn.Sequential(OrderedDict(conv=BiasIgnoringSame(4, 6, 3, bias=False), bn=nn.BatchNorm2d(6))))
    x = example(X4)
    result = fuse(model, x, "fx")
    assert result.ok and result.discovery == "observed"
    assert rel_error(runnable(result)(x), reference(model, x)) < RTOL_FP32
    assert positions(result) == {"after": 1}, result.skipped


def test_bn_after_a_difference_of_convs_is_not_folded_as_a_sum():
    """BN(b(pool(x)) - a(x)): folding the shift into a would subtract it; the rule for Adds must not take a Sub.
    (With both convs reading x, the difference merges into one conv first, and the BN then folds into it.)"""

    class Diff(nn.Module):
        def __init__(self, same_input: bool) -> None:
            super().__init__()
            self.same_input = same_input
            self.a = nn.Conv2d(4, 6, 3, padding=1, stride=1 if same_input else 2)
            self.b = nn.Conv2d(4, 6, 1, bias=False)
            self.pool = nn.AvgPool2d(2)
            self.bn = nn.BatchNorm2d(6)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.bn(self.b(x if self.same_input else self.pool(x)) - self.a(x))

    for same_input in (False, True):
        torch.manual_seed(0)
        model = randomize(Diff(same_input))
        x = example(X4)
        result = fuse(model, x, "fx")
        assert result.ok
        assert rel_error(runnable(result)(x), reference(model, x)) < RTOL_FP32
        if same_input:
            assert positions(result) == {"after": 1} and any("merged 2 branches" in n for n in result.notes)
        else:
            assert [s.bn for s in result.skipped] == ["bn"] and not result.folded
