"""CNN with data-dependent control flow: torch.fx.symbolic_trace cannot trace it.

The branch is chosen by the sign of the *input's* mean (``x.mean() > 0``), so
folding BN anywhere in the network never flips the branch. Feed ``x`` and ``-x``
to exercise both branches. Both branches contain conv->BN pairs.
"""
from __future__ import annotations

import torch
from torch import nn


class UntraceableNet(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        self.stem_conv = nn.Conv2d(in_channels, 16, 3, stride=2, padding=1, bias=False)
        self.stem_bn = nn.BatchNorm2d(16)
        # Branch taken when the input mean is positive.
        self.pos_conv = nn.Conv2d(16, 16, 3, padding=1, bias=False)
        self.pos_bn = nn.BatchNorm2d(16)
        # Branch taken otherwise.
        self.neg_conv = nn.Conv2d(16, 16, 1, bias=False)
        self.neg_bn = nn.BatchNorm2d(16)
        self.head_conv = nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False)
        self.head_bn = nn.BatchNorm2d(32)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        positive = x.mean() > 0
        y = self.relu(self.stem_bn(self.stem_conv(x)))
        if positive:  # data-dependent: a Proxy cannot be converted to bool
            y = self.relu(self.pos_bn(self.pos_conv(y)))
        else:
            y = self.relu(self.neg_bn(self.neg_conv(y)))
        y = self.relu(self.head_bn(self.head_conv(y)))
        return self.fc(torch.flatten(self.pool(y), 1))


def untraceable_tiny(num_classes: int = 10, in_channels: int = 3) -> UntraceableNet:
    return UntraceableNet(num_classes=num_classes, in_channels=in_channels)
