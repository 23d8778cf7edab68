"""Re-parameterisable (multi-branch) networks and their look-alike negatives.

Six small networks, written the way timm and the original papers write them:

* ``repvgg_tiny``: RepVGG training-time blocks (3x3 conv+BN, 1x1 conv+BN, identity BN, summed).
* ``mobileone_tiny``: MobileOne training-time blocks (skip BN, 1x1 scale conv+BN, k conv+BN branches).
* ``mixconv_tiny``: BN after a ``torch.cat`` of per-split depthwise convs (MixConv) and of two
  convs reading the same input (Inception-style).
* ``residual_bn_tiny``: BN after the sum of two bias-less convs (same input, then different inputs),
  and BatchNorm1d after the sum of two Linears.
* ``same_pad_tiny``: convs that subclass nn.Conv2d and pad in forward (timm ``Conv2dSame``) and a
  Linear subclass calling ``F.linear``; not torch.fx-traceable, torch.export-able.
* ``reparam_negatives_tiny``: structures a branch-merge / concat / fold rule must refuse.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


def _conv_bn(in_ch: int, out_ch: int, kernel_size: int, stride: int, padding: int, groups: int = 1) -> nn.Sequential:
    """Sequential(conv=Conv2d(bias=False), bn=BatchNorm2d), as RepVGG's and MobileOne's ``conv_bn``."""
    result = nn.Sequential()
    result.add_module(
        "conv", nn.Conv2d(in_ch, out_ch, kernel_size, stride=stride, padding=padding, groups=groups, bias=False)
    )
    result.add_module("bn", nn.BatchNorm2d(out_ch))
    return result


# -- RepVGG ----------------------------------------------------------------------------------------------------------
class RepVGGBlock(nn.Module):
    """relu(3x3 conv+BN + 1x1 conv+BN + identity BN); the identity BN only for stride 1, in == out."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1, groups: int = 1) -> None:
        super().__init__()
        self.nonlinearity = nn.ReLU()
        self.rbr_identity = nn.BatchNorm2d(in_ch) if in_ch == out_ch and stride == 1 else None
        self.rbr_dense = _conv_bn(in_ch, out_ch, 3, stride, 1, groups)
        self.rbr_1x1 = _conv_bn(in_ch, out_ch, 1, stride, 0, groups)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        if self.rbr_identity is None:
            id_out = 0
        else:
            id_out = self.rbr_identity(inputs)
        return self.nonlinearity(self.rbr_dense(inputs) + self.rbr_1x1(inputs) + id_out)


class RepVGG(nn.Module):
    """stage0: stride-2 stem block (no identity); stage1: two identity blocks and a groups=2 one;
    stage2: a stride-2 block (no identity); then global average pool and Linear."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: int = 16) -> None:
        super().__init__()
        self.stage0 = RepVGGBlock(in_channels, width, stride=2)
        self.stage1 = nn.Sequential(
            RepVGGBlock(width, width), RepVGGBlock(width, width), RepVGGBlock(width, width, groups=2)
        )
        self.stage2 = nn.Sequential(RepVGGBlock(width, 2 * width, stride=2))
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage2(self.stage1(self.stage0(x)))
        return self.linear(torch.flatten(self.gap(x), 1))


def repvgg_tiny(num_classes: int = 10, in_channels: int = 3) -> RepVGG:
    return RepVGG(num_classes=num_classes, in_channels=in_channels)


# -- MobileOne -------------------------------------------------------------------------------------------------------
class MobileOneBlock(nn.Module):
    """act(skip BN + 1x1 scale conv+BN + sum of ``num_conv_branches`` kxk conv+BN), all branches optional
    except the conv ones: skip only for stride 1, in == out; scale only for kernel_size > 1."""

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        kernel_size: int,
        stride: int = 1,
        padding: int = 0,
        groups: int = 1,
        num_conv_branches: int = 1,
    ) -> None:
        super().__init__()
        self.num_conv_branches = num_conv_branches
        self.act = nn.ReLU()
        self.rbr_skip = nn.BatchNorm2d(in_ch) if out_ch == in_ch and stride == 1 else None
        self.rbr_conv = nn.ModuleList(
            [_conv_bn(in_ch, out_ch, kernel_size, stride, padding, groups) for _ in range(num_conv_branches)]
        )
        self.rbr_scale = _conv_bn(in_ch, out_ch, 1, stride, 0, groups) if kernel_size > 1 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity_out = 0
        if self.rbr_skip is not None:
            identity_out = self.rbr_skip(x)
        scale_out = 0
        if self.rbr_scale is not None:
            scale_out = self.rbr_scale(x)
        out = scale_out + identity_out
        for ix in range(self.num_conv_branches):
            out += self.rbr_conv[ix](x)
        return self.act(out)


class MobileOne(nn.Module):
    """stage0: 3x3 stride-2 stem block with one conv branch (as Apple's); stage1, stage2: a depthwise 3x3
    block then a pointwise 1x1 block, three conv branches each. stage1 (stride 1, 16 -> 16) has skip BNs;
    stage2 opens with a stride-2 depthwise block (scale, no skip) and widens to 32 (pointwise 16 -> 32: conv
    branches only, so ``out`` starts as the int 0)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: int = 16, branches: int = 3) -> None:
        super().__init__()
        self.stage0 = MobileOneBlock(in_channels, width, 3, stride=2, padding=1)
        self.stage1 = nn.Sequential(*self._pair(width, width, 1, branches))
        self.stage2 = nn.Sequential(*self._pair(width, 2 * width, 2, branches))
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(2 * width, num_classes)

    @staticmethod
    def _pair(in_ch: int, out_ch: int, stride: int, branches: int) -> list[nn.Module]:
        return [
            MobileOneBlock(in_ch, in_ch, 3, stride=stride, padding=1, groups=in_ch, num_conv_branches=branches),
            MobileOneBlock(in_ch, out_ch, 1, stride=1, padding=0, groups=1, num_conv_branches=branches),
        ]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage2(self.stage1(self.stage0(x)))
        return self.linear(torch.flatten(self.gap(x), 1))


def mobileone_tiny(num_classes: int = 10, in_channels: int = 3) -> MobileOne:
    return MobileOne(num_classes=num_classes, in_channels=in_channels)


# -- MixConv / Inception: BN after torch.cat -------------------------------------------------------------------------
def _split_channels(num_chan: int, num_groups: int) -> list[int]:
    split = [num_chan // num_groups for _ in range(num_groups)]
    split[0] += num_chan - sum(split)
    return split


class MixedConv2d(nn.ModuleDict):
    """timm's MixedConv2d, depthwise: split channels (uneven: 16 -> 6, 5, 5), one kxk conv per split, cat."""

    def __init__(self, channels: int, kernel_sizes: tuple[int, ...] = (3, 5, 7)) -> None:
        super().__init__()
        self.splits = _split_channels(channels, len(kernel_sizes))
        for idx, (k, ch) in enumerate(zip(kernel_sizes, self.splits)):
            self.add_module(str(idx), nn.Conv2d(ch, ch, k, padding=k // 2, groups=ch, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_split = torch.split(x, self.splits, 1)
        x_out = [c(x_split[i]) for i, c in enumerate(self.values())]
        return torch.cat(x_out, dim=1)


class MixConvBlock(nn.Module):
    """MixedConv2d -> one BatchNorm2d over all channels -> ReLU: each BN slice belongs to one split's conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = MixedConv2d(channels)
        self.bn = nn.BatchNorm2d(channels)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class InceptionBlock(nn.Module):
    """cat(1x1 conv (no bias), 3x3 conv (with bias)) of the same input -> BatchNorm2d -> ReLU."""

    def __init__(self, in_ch: int, ch1x1: int, ch3x3: int) -> None:
        super().__init__()
        self.branch1x1 = nn.Conv2d(in_ch, ch1x1, 1, bias=False)
        self.branch3x3 = nn.Conv2d(in_ch, ch3x3, 3, padding=1, bias=True)
        self.bn = nn.BatchNorm2d(ch1x1 + ch3x3)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(torch.cat([self.branch1x1(x), self.branch3x3(x)], dim=1)))


class MixConvNet(nn.Module):
    """conv+BN stem (stride 2), a MixConv block (kernels 3, 5, 7), an Inception-style block, pool, Linear."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        self.stem_conv = nn.Conv2d(in_channels, 16, 3, stride=2, padding=1, bias=False)
        self.stem_bn = nn.BatchNorm2d(16)
        self.stem_act = nn.ReLU()
        self.mix = MixConvBlock(16)
        self.incept = InceptionBlock(16, 8, 16)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(24, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem_act(self.stem_bn(self.stem_conv(x)))
        x = self.incept(self.mix(x))
        return self.fc(torch.flatten(self.pool(x), 1))


def mixconv_tiny(num_classes: int = 10, in_channels: int = 3) -> MixConvNet:
    return MixConvNet(num_classes=num_classes, in_channels=in_channels)


# -- BN after a sum of producers ---------------------------------------------------------------------------------------
class AddBN(nn.Module):
    """bn(conv_a(x) + conv_b(x)): 3x3 and 1x1 bias-less convs reading the same input, no BN on the branches."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv_a = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.conv_b = nn.Conv2d(channels, channels, 1, bias=False)
        self.bn = nn.BatchNorm2d(channels)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv_a(x) + self.conv_b(x)))


class AddBNPooled(nn.Module):
    """bn(conv_a(x) + conv_b(pool(x))): the convs read different tensors (so no single merged conv exists),
    conv_a is a bias-less stride-2 3x3, conv_b a 1x1 *with* bias after a 2x2 average pool."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.conv_a = nn.Conv2d(in_ch, out_ch, 3, stride=2, padding=1, bias=False)
        self.pool = nn.AvgPool2d(2)
        self.conv_b = nn.Conv2d(in_ch, out_ch, 1, bias=True)
        self.bn = nn.BatchNorm2d(out_ch)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv_a(x) + self.conv_b(self.pool(x))))


class ResidualBNNet(nn.Module):
    """conv+BN stem, AddBN, AddBNPooled, then pool -> bn_fc(fc_a(x) + fc_b(x)) -> ReLU -> classifier."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        self.stem_conv = nn.Conv2d(in_channels, 16, 3, stride=2, padding=1, bias=False)
        self.stem_bn = nn.BatchNorm2d(16)
        self.relu = nn.ReLU()
        self.block1 = AddBN(16)
        self.block2 = AddBNPooled(16, 32)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc_a = nn.Linear(32, 16)
        self.fc_b = nn.Linear(32, 16)
        self.bn_fc = nn.BatchNorm1d(16)
        self.classifier = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.stem_bn(self.stem_conv(x)))
        x = self.block2(self.block1(x))
        x = torch.flatten(self.pool(x), 1)
        x = self.relu(self.bn_fc(self.fc_a(x) + self.fc_b(x)))
        return self.classifier(x)


def residual_bn_tiny(num_classes: int = 10, in_channels: int = 3) -> ResidualBNNet:
    return ResidualBNNet(num_classes=num_classes, in_channels=in_channels)


# -- conv / linear subclasses with their own forward ------------------------------------------------------------------
def _same_pad(size: int, kernel: int, stride: int, dilation: int) -> int:
    """Total TensorFlow 'SAME' padding along one dimension."""
    return max((math.ceil(size / stride) - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)


class Conv2dSame(nn.Conv2d):
    """TensorFlow-like 'SAME' conv (timm's Conv2dSame): pads in forward, from the input's shape. The extra
    padding goes right/bottom, so stride 2 on an even size pads (0, 1). Shape-dependent Python control flow:
    torch.fx cannot trace it; torch.export specialises the shapes."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        padding: int = 0,
        dilation: int = 1,
        groups: int = 1,
        bias: bool = True,
    ) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, 0, dilation, groups, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ih, iw = x.shape[-2:]
        pad_h = _same_pad(ih, self.kernel_size[0], self.stride[0], self.dilation[0])
        pad_w = _same_pad(iw, self.kernel_size[1], self.stride[1], self.dilation[1])
        if pad_h > 0 or pad_w > 0:
            x = F.pad(x, [pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class FunctionalLinear(nn.Linear):
    """nn.Linear subclass whose forward calls F.linear itself (a subclass, not nn.Linear's own forward)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class SamePadNet(nn.Module):
    """Conv2dSame -> BN pairs: conv1 3x3 stride 2 (pads 0/1, with bias), conv2 depthwise 3x3 stride 1
    (pads 1/1), conv3 5x5 stride 2 (pads 1/2), conv4 1x1 (no padding); head FunctionalLinear -> BatchNorm1d."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        self.conv1 = Conv2dSame(in_channels, 16, 3, stride=2, bias=True)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = Conv2dSame(16, 16, 3, groups=16, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.conv3 = Conv2dSame(16, 32, 5, stride=2, bias=False)
        self.bn3 = nn.BatchNorm2d(32)
        self.conv4 = Conv2dSame(32, 32, 1, bias=False)
        self.bn4 = nn.BatchNorm2d(32)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = FunctionalLinear(32, 16)
        self.bn_fc = nn.BatchNorm1d(16)
        self.classifier = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.relu(self.bn2(self.conv2(x)))
        x = self.relu(self.bn3(self.conv3(x)))
        x = self.relu(self.bn4(self.conv4(x)))
        x = torch.flatten(self.pool(x), 1)
        x = self.relu(self.bn_fc(self.fc(x)))
        return self.classifier(x)


def same_pad_tiny(num_classes: int = 10, in_channels: int = 3) -> SamePadNet:
    return SamePadNet(num_classes=num_classes, in_channels=in_channels)


# -- negatives -------------------------------------------------------------------------------------------------------
class StdConv2d(nn.Conv2d):
    """Weight-standardised conv (timm's StdConv2d): forward standardises ``self.weight`` per output channel,
    so any per-channel scale folded into ``weight`` is normalised away again."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        padding: Optional[int] = None,
        dilation: int = 1,
        groups: int = 1,
        bias: bool = False,
        eps: float = 1e-6,
    ) -> None:
        if padding is None:
            padding = ((stride - 1) + dilation * (kernel_size - 1)) // 2
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = F.batch_norm(
            self.weight.reshape(1, self.out_channels, -1), None, None, training=True, momentum=0.0, eps=self.eps
        ).reshape_as(self.weight)
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class ReparamNegatives(nn.Module):
    """(a) ``std_conv -> bn_a``: weight-standardised conv, folding bn_a into its weight is not exact.
    (b) ``bn_b`` after cat(conv_b1(x), conv_b2(x)) where conv_b1's output is also added to the block output:
        bn_b's slice 0:16 must not go into conv_b1 (the slice 16:24 into conv_b2 would be exact).
    (c) ``bn_c1(conv_c1(x)) + bn_c2(conv_c2(x))``: same input, same 4x4 output, strides 2 (k=2) and 1 (k=5):
        each BN folds into its own conv, but the branches must not be merged into one conv.
    (d) ``bn_d1(conv_d1(x)) + bn_d2(conv_d2(x))``: same input, same stride and output shape, both 3x3, but
        conv_d2 is dilated (d=2, p=2): the kernels cannot be summed (neither footprint holds the other).
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        self.std_conv = StdConv2d(in_channels, 16, 3, stride=2, padding=1)  # (a)
        self.bn_a = nn.BatchNorm2d(16)
        self.conv_b1 = nn.Conv2d(16, 16, 3, padding=1, bias=False)  # (b)
        self.conv_b2 = nn.Conv2d(16, 8, 1, bias=False)
        self.bn_b = nn.BatchNorm2d(24)
        self.proj_b = nn.Conv2d(24, 16, 1, bias=True)
        self.conv_d1 = nn.Conv2d(16, 16, 3, padding=1, bias=False)  # (d)
        self.bn_d1 = nn.BatchNorm2d(16)
        self.conv_d2 = nn.Conv2d(16, 16, 3, padding=2, dilation=2, bias=False)
        self.bn_d2 = nn.BatchNorm2d(16)
        self.conv_c1 = nn.Conv2d(16, 32, 2, stride=2, padding=0, bias=False)  # (c)
        self.bn_c1 = nn.BatchNorm2d(32)
        self.conv_c2 = nn.Conv2d(16, 32, 5, stride=1, padding=0, bias=False)
        self.bn_c2 = nn.BatchNorm2d(32)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn_a(self.std_conv(x)))  # 16x16 -> 8x8
        a = self.conv_b1(x)
        y = self.relu(self.bn_b(torch.cat([a, self.conv_b2(x)], dim=1)))
        x = self.proj_b(y) + a  # conv_b1's raw output reused
        x = self.relu(self.bn_d1(self.conv_d1(x)) + self.bn_d2(self.conv_d2(x)))
        x = self.relu(self.bn_c1(self.conv_c1(x)) + self.bn_c2(self.conv_c2(x)))  # 8x8 -> 4x4
        return self.fc(torch.flatten(self.pool(x), 1))


def reparam_negatives_tiny(num_classes: int = 10, in_channels: int = 3) -> ReparamNegatives:
    return ReparamNegatives(num_classes=num_classes, in_channels=in_channels)
