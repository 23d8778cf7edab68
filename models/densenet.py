"""DenseNet-style network with pre-activation (BN-ReLU-Conv) layers."""
from __future__ import annotations

import torch
from torch import nn


class DenseLayer(nn.Module):
    """BN-ReLU-Conv1x1-BN-ReLU-Conv3x3; output concatenated onto the input."""

    def __init__(self, in_ch: int, growth_rate: int, bn_size: int = 4) -> None:
        super().__init__()
        inner = bn_size * growth_rate
        self.norm1 = nn.BatchNorm2d(in_ch)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_ch, inner, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(inner)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(inner, growth_rate, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(self.relu1(self.norm1(x)))
        out = self.conv2(self.relu2(self.norm2(out)))
        return torch.cat([x, out], dim=1)


class Transition(nn.Sequential):
    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(in_ch)
        self.relu = nn.ReLU(inplace=True)
        self.conv = nn.Conv2d(in_ch, out_ch, 1, bias=False)
        self.pool = nn.AvgPool2d(2, stride=2)


class DenseNet(nn.Module):
    def __init__(
        self,
        block_config: tuple[int, ...] = (2, 2),
        growth_rate: int = 8,
        stem_channels: int = 16,
        num_classes: int = 10,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        self.stem_conv = nn.Conv2d(in_channels, stem_channels, 3, padding=1, bias=False)
        self.stem_bn = nn.BatchNorm2d(stem_channels)
        self.stem_relu = nn.ReLU(inplace=True)

        layers: list[nn.Module] = []
        channels = stem_channels
        for i, num_layers in enumerate(block_config):
            for _ in range(num_layers):
                layers.append(DenseLayer(channels, growth_rate))
                channels += growth_rate
            if i != len(block_config) - 1:
                layers.append(Transition(channels, channels // 2))
                channels //= 2
        self.features = nn.Sequential(*layers)
        self.final_bn = nn.BatchNorm2d(channels)
        self.final_relu = nn.ReLU(inplace=True)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem_relu(self.stem_bn(self.stem_conv(x)))
        x = self.features(x)
        x = self.pool(self.final_relu(self.final_bn(x)))
        return self.classifier(torch.flatten(x, 1))


def densenet_tiny(num_classes: int = 10, in_channels: int = 3) -> DenseNet:
    return DenseNet((2, 2), growth_rate=8, stem_channels=16, num_classes=num_classes, in_channels=in_channels)
