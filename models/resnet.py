"""ResNet-style networks built from Bottleneck blocks."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn


class Bottleneck(nn.Module):
    """conv1x1-bn-relu -> conv3x3-bn-relu -> conv1x1-bn, plus shortcut, relu."""

    expansion = 4

    def __init__(self, in_channels: int, width: int, stride: int = 1) -> None:
        super().__init__()
        out_channels = width * self.expansion
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: Optional[nn.Sequential] = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        return self.relu(out + identity)


class ResNet(nn.Module):
    def __init__(
        self,
        layers: list[int],
        base_width: int = 64,
        num_classes: int = 1000,
        in_channels: int = 3,
        small_input: bool = False,
    ) -> None:
        super().__init__()
        if small_input:
            # For tiny images: 3x3 stride-1 stem, no max-pool.
            self.conv1 = nn.Conv2d(in_channels, base_width, 3, padding=1, bias=False)
            self.maxpool: nn.Module = nn.Identity()
        else:
            self.conv1 = nn.Conv2d(in_channels, base_width, 7, stride=2, padding=3, bias=False)
            self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.bn1 = nn.BatchNorm2d(base_width)
        self.relu = nn.ReLU(inplace=True)

        channels = base_width
        stages = []
        for i, num_blocks in enumerate(layers):
            width = base_width * (2**i)
            blocks = []
            for j in range(num_blocks):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(Bottleneck(channels, width, stride))
                channels = width * Bottleneck.expansion
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.stages(x)
        x = self.avgpool(x)
        return self.fc(torch.flatten(x, 1))


def resnet_tiny(num_classes: int = 10, in_channels: int = 3) -> ResNet:
    """Four stages with one bottleneck each, base width 8 (~0.1M params)."""
    return ResNet([1, 1, 1, 1], base_width=8, num_classes=num_classes, in_channels=in_channels)


def resnet50(num_classes: int = 1000, in_channels: int = 3) -> ResNet:
    """The standard ResNet-50 layout (~25.5M params)."""
    return ResNet([3, 4, 6, 3], base_width=64, num_classes=num_classes, in_channels=in_channels)


def resnet_digits(num_classes: int = 10) -> ResNet:
    """Small ResNet for 1x8x8 grayscale digits: 3x3 stride-1 stem, no max-pool, 2 stages."""
    return ResNet([1, 1], base_width=16, num_classes=num_classes, in_channels=1, small_input=True)
