"""1-D convolutional network for raw audio (N, 1, 256)."""
from __future__ import annotations

import torch
from torch import nn


class ConvBlock1d(nn.Sequential):
    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        kernel_size: int,
        stride: int = 1,
        dilation: int = 1,
        padding_mode: str = "zeros",
    ) -> None:
        super().__init__()
        padding = dilation * (kernel_size - 1) // 2
        self.conv = nn.Conv1d(
            in_ch, out_ch, kernel_size, stride=stride, padding=padding, dilation=dilation,
            padding_mode=padding_mode, bias=False,
        )
        self.bn = nn.BatchNorm1d(out_ch)
        self.act = nn.ReLU(inplace=True)


class AudioNet(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 1) -> None:
        super().__init__()
        self.features = nn.Sequential(
            ConvBlock1d(in_channels, 16, 9, stride=4, padding_mode="reflect"),  # 256 -> 64
            ConvBlock1d(16, 32, 3, dilation=2),                                # 64 -> 64
            ConvBlock1d(32, 32, 3, stride=2, dilation=4),                      # 64 -> 32
            ConvBlock1d(32, 48, 3, stride=2),                                  # 32 -> 16
        )
        self.pool = nn.AdaptiveAvgPool1d(1)
        self.classifier = nn.Linear(48, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


def audio_tiny(num_classes: int = 10) -> AudioNet:
    return AudioNet(num_classes=num_classes)
