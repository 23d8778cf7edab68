"""3-D convolutional network for short clips (N, 3, 4, 16, 16)."""
from __future__ import annotations

import torch
from torch import nn


class ConvBlock3d(nn.Sequential):
    def __init__(self, in_ch: int, out_ch: int, kernel_size: tuple[int, int, int], stride: tuple[int, int, int]) -> None:
        super().__init__()
        padding = tuple(k // 2 for k in kernel_size)
        self.conv = nn.Conv3d(in_ch, out_ch, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm3d(out_ch)
        self.act = nn.ReLU(inplace=True)


class VideoNet(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        self.block1 = ConvBlock3d(in_channels, 8, (3, 3, 3), (1, 2, 2))  # (4, 16, 16) -> (4, 8, 8)
        self.block2 = ConvBlock3d(8, 16, (3, 3, 3), (2, 2, 2))           # -> (2, 4, 4)
        # Transposed 3-D conv upsamples space back: (2, 4, 4) -> (2, 8, 8).
        self.up = nn.ConvTranspose3d(16, 12, (1, 2, 2), stride=(1, 2, 2), bias=False)
        self.up_bn = nn.BatchNorm3d(12)
        self.up_act = nn.ReLU(inplace=True)
        self.block3 = ConvBlock3d(12, 16, (1, 3, 3), (1, 1, 1))
        self.pool = nn.AdaptiveAvgPool3d(1)
        self.classifier = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block2(self.block1(x))
        x = self.up_act(self.up_bn(self.up(x)))
        x = self.pool(self.block3(x))
        return self.classifier(torch.flatten(x, 1))


def video_tiny(num_classes: int = 10) -> VideoNet:
    return VideoNet(num_classes=num_classes)
