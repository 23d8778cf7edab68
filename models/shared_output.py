"""Cases where a conv->BN edge exists but folding would change other consumers.

* ``conv_shared`` output feeds ``bn_shared`` *and* a residual add -> must NOT fold.
* ``conv_split`` output feeds two BNs (``bn_split_a``, ``bn_split_b``) -> neither may fold.
* ``conv_stem -> bn_stem`` and ``conv_out -> bn_out`` are ordinary pairs -> fold.
  (``bn_out``'s *output* is used twice, which does not prevent folding.)
"""
from __future__ import annotations

import torch
from torch import nn


class SharedOutputNet(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        self.conv_stem = nn.Conv2d(in_channels, 16, 3, stride=2, padding=1, bias=False)
        self.bn_stem = nn.BatchNorm2d(16)
        self.conv_shared = nn.Conv2d(16, 16, 3, padding=1, bias=False)
        self.bn_shared = nn.BatchNorm2d(16)
        self.conv_split = nn.Conv2d(16, 16, 1, bias=False)
        self.bn_split_a = nn.BatchNorm2d(16)
        self.bn_split_b = nn.BatchNorm2d(16)
        self.conv_out = nn.Conv2d(32, 32, 3, stride=2, padding=1, bias=False)
        self.bn_out = nn.BatchNorm2d(32)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn_stem(self.conv_stem(x)))
        y = self.conv_shared(x)
        x = self.relu(self.bn_shared(y)) + y  # raw conv output reused
        z = self.conv_split(x)
        x = torch.cat([self.relu(self.bn_split_a(z)), torch.sigmoid(self.bn_split_b(z))], dim=1)
        w = self.bn_out(self.conv_out(x))
        x = self.relu(w) + 0.5 * w  # BN output reused: still foldable
        return self.fc(torch.flatten(self.pool(x), 1))


def shared_output_tiny(num_classes: int = 10, in_channels: int = 3) -> SharedOutputNet:
    return SharedOutputNet(num_classes=num_classes, in_channels=in_channels)
