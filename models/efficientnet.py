"""EfficientNet-style network: MBConv blocks with squeeze-and-excitation."""
from __future__ import annotations

import torch
from torch import nn


class ConvBNSiLU(nn.Sequential):
    def __init__(self, in_ch: int, out_ch: int, kernel_size: int, stride: int = 1, groups: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(
            in_ch, out_ch, kernel_size, stride=stride, padding=kernel_size // 2, groups=groups, bias=False
        )
        self.bn = nn.BatchNorm2d(out_ch)
        self.act = nn.SiLU(inplace=True)


class SqueezeExcite(nn.Module):
    """avgpool -> conv1x1 reduce -> SiLU -> conv1x1 expand -> sigmoid -> scale input."""

    def __init__(self, channels: int, reduced: int) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.reduce = nn.Conv2d(channels, reduced, 1)
        self.act = nn.SiLU(inplace=True)
        self.expand = nn.Conv2d(reduced, channels, 1)
        self.gate = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.gate(self.expand(self.act(self.reduce(self.pool(x)))))
        return x * s


class MBConv(nn.Module):
    def __init__(
        self, in_ch: int, out_ch: int, kernel_size: int, stride: int, expand_ratio: int, se_ratio: float = 0.25
    ) -> None:
        super().__init__()
        hidden = in_ch * expand_ratio
        self.use_residual = stride == 1 and in_ch == out_ch
        self.expand = ConvBNSiLU(in_ch, hidden, 1) if expand_ratio != 1 else nn.Identity()
        self.depthwise = ConvBNSiLU(hidden, hidden, kernel_size, stride=stride, groups=hidden)
        self.se = SqueezeExcite(hidden, max(1, int(in_ch * se_ratio)))
        self.project = nn.Conv2d(hidden, out_ch, 1, bias=False)
        self.project_bn = nn.BatchNorm2d(out_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.se(self.depthwise(self.expand(x)))
        out = self.project_bn(self.project(out))
        if self.use_residual:
            out = out + x
        return out


class EfficientNet(nn.Module):
    # (expand_ratio, kernel_size, out_channels, num_blocks, first_stride)
    def __init__(
        self,
        config: list[tuple[int, int, int, int, int]],
        stem_channels: int = 16,
        head_channels: int = 64,
        num_classes: int = 10,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        self.stem = ConvBNSiLU(in_channels, stem_channels, 3, stride=2)
        blocks: list[nn.Module] = []
        channels = stem_channels
        for expand_ratio, kernel_size, out_ch, num_blocks, first_stride in config:
            for i in range(num_blocks):
                blocks.append(MBConv(channels, out_ch, kernel_size, first_stride if i == 0 else 1, expand_ratio))
                channels = out_ch
        self.blocks = nn.Sequential(*blocks)
        self.head = ConvBNSiLU(channels, head_channels, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(head_channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.head(self.blocks(self.stem(x)))
        x = self.pool(x)
        return self.classifier(torch.flatten(x, 1))


def efficientnet_tiny(num_classes: int = 10, in_channels: int = 3) -> EfficientNet:
    config = [
        (1, 3, 8, 1, 1),   # no expansion conv
        (4, 3, 16, 2, 2),  # second block has a residual
        (4, 5, 24, 1, 2),
    ]
    return EfficientNet(config, num_classes=num_classes, in_channels=in_channels)
