"""FastViT-style RepMixer blocks, written as timm writes them (``timm.models.fastvit``).

A RepMixer computes ``x + layer_scale * (mixer(x) - norm(x))``: ``mixer`` is a MobileOne block without an
activation (identity BN, a 1x1 scale conv+BN and a depthwise kxk conv+BN, summed), ``norm`` a MobileOne block
with the identity BN alone, and ``layer_scale`` a learned per-channel vector. The whole expression is one
depthwise conv: timm's ``reparameterize_model`` computes it with the model's own code; bnfold must find it in
the graph (Adds, a Sub, a per-channel Mul and Identity modules). The ConvMlp after it has a depthwise
conv+BN (an ordinary fold) and its own layer-scaled residual.
"""
from __future__ import annotations

import torch
from torch import nn


class MobileOneBranches(nn.Module):
    """timm's ``MobileOneBlock`` with ``use_act=False``: identity BN, scale 1x1 conv+BN, kxk conv+BN branches,
    then ``se`` and ``act`` (both Identity here)."""

    def __init__(self, channels: int, kernel_size: int, num_conv_branches: int, use_scale_branch: bool) -> None:
        super().__init__()
        self.identity = nn.BatchNorm2d(channels)
        self.conv_kxk = nn.ModuleList([self._conv_bn(channels, kernel_size) for _ in range(num_conv_branches)])
        self.conv_scale = self._conv_bn(channels, 1) if use_scale_branch and kernel_size > 1 else None
        self.se = nn.Identity()
        self.act = nn.Identity()

    @staticmethod
    def _conv_bn(channels: int, kernel_size: int) -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(channels, channels, kernel_size, padding=kernel_size // 2, groups=channels,
                                       bias=False), nn.BatchNorm2d(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity_out = self.identity(x)
        scale_out = 0
        if self.conv_scale is not None:
            scale_out = self.conv_scale(x)
        out = scale_out + identity_out
        for rc in self.conv_kxk:
            out += rc(x)
        return self.act(self.se(out))


class LayerScale2d(nn.Module):
    def __init__(self, dim: int, init_value: float = 1e-5) -> None:
        super().__init__()
        self.gamma = nn.Parameter(init_value * torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma.view(1, -1, 1, 1)


class RepMixer(nn.Module):
    def __init__(self, dim: int, kernel_size: int = 3) -> None:
        super().__init__()
        self.norm = MobileOneBranches(dim, kernel_size, num_conv_branches=0, use_scale_branch=False)
        self.mixer = MobileOneBranches(dim, kernel_size, num_conv_branches=1, use_scale_branch=True)
        self.layer_scale = LayerScale2d(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.layer_scale(self.mixer(x) - self.norm(x))


class ConvMlp(nn.Module):
    """Depthwise 7x7 conv+BN, 1x1 expand, GELU, 1x1 project (FastViT's ConvMlp)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(dim, dim, 7, padding=3, groups=dim, bias=False), nn.BatchNorm2d(dim))
        self.fc1 = nn.Conv2d(dim, hidden, 1)
        self.act = nn.GELU()
        self.fc2 = nn.Conv2d(hidden, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(self.conv(x))))


class RepMixerBlock(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.token_mixer = RepMixer(dim)
        self.mlp = ConvMlp(dim, 2 * dim)
        self.layer_scale = LayerScale2d(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.token_mixer(x)
        return x + self.layer_scale(self.mlp(x))


class RepMixerNet(nn.Module):
    """conv+BN+GELU stem (stride 2), two RepMixer blocks, pool, Linear."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, dim: int = 16) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, dim, 3, stride=2, padding=1, bias=False),
                                  nn.BatchNorm2d(dim), nn.GELU())
        self.blocks = nn.Sequential(RepMixerBlock(dim), RepMixerBlock(dim))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.pool(self.blocks(self.stem(x))), 1))


def repmixer_tiny(num_classes: int = 10, in_channels: int = 3) -> RepMixerNet:
    model = RepMixerNet(num_classes=num_classes, in_channels=in_channels)
    with torch.no_grad():  # layer scales of a trained model, not the 1e-5 they start at
        for module in model.modules():
            if isinstance(module, LayerScale2d):
                module.gamma.copy_(torch.linspace(0.2, 1.5, module.gamma.numel()))
    return model
