"""Decoder / upsampler built from ConvTranspose2d layers followed by BatchNorm2d."""
from __future__ import annotations

import torch
from torch import nn


class Decoder(nn.Module):
    """(N, in_channels, 4, 4) -> (N, 3, 16, 16)."""

    def __init__(self, in_channels: int = 8, out_channels: int = 3) -> None:
        super().__init__()
        # Grouped transposed conv with bias: 4x4 -> 8x8.
        self.up1 = nn.ConvTranspose2d(
            in_channels, 16, 3, stride=2, padding=1, output_padding=1, groups=2, bias=True
        )
        self.bn1 = nn.BatchNorm2d(16)
        self.relu1 = nn.ReLU(inplace=True)
        # Plain transposed conv without bias: 8x8 -> 16x16.
        self.up2 = nn.ConvTranspose2d(16, 8, 4, stride=2, padding=1, groups=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.relu2 = nn.ReLU(inplace=True)
        self.out = nn.Conv2d(8, out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu1(self.bn1(self.up1(x)))
        x = self.relu2(self.bn2(self.up2(x)))
        return self.out(x)


def decoder_tiny(in_channels: int = 8) -> Decoder:
    return Decoder(in_channels=in_channels)
