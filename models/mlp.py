"""MLP with an input BatchNorm1d (BN *before* a Linear) and Linear-BN-ReLU blocks."""
from __future__ import annotations

import torch
from torch import nn


class LinearBNReLU(nn.Sequential):
    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.fc = nn.Linear(in_features, out_features)
        self.bn = nn.BatchNorm1d(out_features)
        self.act = nn.ReLU(inplace=True)


class MLP(nn.Module):
    def __init__(self, in_features: int = 32, hidden: int = 64, num_classes: int = 10) -> None:
        super().__init__()
        self.input_bn = nn.BatchNorm1d(in_features)  # normalises raw features; foldable into input_fc
        self.input_fc = nn.Linear(in_features, hidden)
        self.input_act = nn.ReLU(inplace=True)
        self.blocks = nn.Sequential(
            LinearBNReLU(hidden, hidden),
            LinearBNReLU(hidden, hidden // 2),
        )
        self.classifier = nn.Linear(hidden // 2, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.input_act(self.input_fc(self.input_bn(x)))
        return self.classifier(self.blocks(x))


def mlp_tiny(in_features: int = 32, num_classes: int = 10) -> MLP:
    return MLP(in_features=in_features, num_classes=num_classes)
