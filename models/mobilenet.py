"""MobileNetV2-style network built from inverted residual blocks."""
from __future__ import annotations

import torch
from torch import nn


class ConvBNReLU6(nn.Sequential):
    """Conv2d (no bias) -> BatchNorm2d -> ReLU6, children named conv/bn/act."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int, stride: int = 1, groups: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(
            in_ch, out_ch, kernel_size, stride=stride, padding=kernel_size // 2, groups=groups, bias=False
        )
        self.bn = nn.BatchNorm2d(out_ch)
        self.act = nn.ReLU6(inplace=True)


class InvertedResidual(nn.Module):
    """1x1 expand -> 3x3 depthwise -> 1x1 linear projection (+ residual)."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = in_ch * expand_ratio
        self.use_residual = stride == 1 and in_ch == out_ch
        self.expand = ConvBNReLU6(in_ch, hidden, 1)
        self.depthwise = ConvBNReLU6(hidden, hidden, 3, stride=stride, groups=hidden)
        self.project = nn.Conv2d(hidden, out_ch, 1, bias=False)
        self.project_bn = nn.BatchNorm2d(out_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.project_bn(self.project(self.depthwise(self.expand(x))))
        if self.use_residual:
            out = out + x
        return out


class MobileNetV2(nn.Module):
    # (expand_ratio, out_channels, num_blocks, first_stride)
    def __init__(
        self,
        config: list[tuple[int, int, int, int]],
        stem_channels: int = 8,
        last_channels: int = 64,
        num_classes: int = 10,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = [ConvBNReLU6(in_channels, stem_channels, 3, stride=2)]
        channels = stem_channels
        for expand_ratio, out_ch, num_blocks, first_stride in config:
            for i in range(num_blocks):
                layers.append(InvertedResidual(channels, out_ch, first_stride if i == 0 else 1, expand_ratio))
                channels = out_ch
        layers.append(ConvBNReLU6(channels, last_channels, 1))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(last_channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


def mobilenet_tiny(num_classes: int = 10, in_channels: int = 3) -> MobileNetV2:
    config = [
        (1, 8, 1, 1),   # expand_ratio 1 still has a (trivial) 1x1 expand conv here
        (4, 12, 2, 2),  # second block has a residual
        (4, 16, 2, 2),
    ]
    return MobileNetV2(config, num_classes=num_classes, in_channels=in_channels)
