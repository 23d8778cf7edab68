"""Remaining BN placements and flavours in one small network.

(a) ``fbn``: module calling ``F.batch_norm`` on ``self.conv(x)`` with its own params/buffers.
(b) ``bn_b``: BatchNorm2d(affine=False) after ``conv_b``.
(c) ``bn_c``: nn.SyncBatchNorm after ``conv_c`` (eval on CPU needs no process group).
(d) ``bn_d`` directly before an unpadded 1x1 ``conv_d`` -> foldable into conv_d.
(e) ``bn_e`` directly before a padded 3x3 ``conv_e`` -> must NOT fold (zero padding
    is applied after BN's shift, so border outputs would change). It runs on a
    4x4 map (for a 16x16 input) so the border error clearly shows in the logits.
(f) ``conv_f`` has bias=True, followed by ``bn_f``.
(g) ``fc_g`` (Linear) -> ``bn_g`` (BatchNorm1d) in the head.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ConvFunctionalBN(nn.Module):
    """Conv followed by a BN implemented with F.batch_norm on this module's own tensors."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False)
        self.weight = nn.Parameter(torch.ones(out_ch))
        self.bias = nn.Parameter(torch.zeros(out_ch))
        self.register_buffer("running_mean", torch.zeros(out_ch))
        self.register_buffer("running_var", torch.ones(out_ch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(
            self.conv(x), self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, 1e-5
        )


class SpecialNet(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        self.fbn = ConvFunctionalBN(in_channels, 16)                      # (a)
        self.relu_a = nn.ReLU()
        self.conv_b = nn.Conv2d(16, 16, 3, stride=2, padding=1, bias=False)  # (b)
        self.bn_b = nn.BatchNorm2d(16, affine=False)
        self.relu_b = nn.ReLU()
        self.conv_c = nn.Conv2d(16, 16, 3, stride=2, padding=1, bias=False)  # (c)
        self.bn_c = nn.SyncBatchNorm(16)
        self.relu_c = nn.ReLU()
        self.bn_d = nn.BatchNorm2d(16)                                    # (d)
        self.conv_d = nn.Conv2d(16, 24, 1, bias=False)
        self.relu_d = nn.ReLU()
        self.bn_e = nn.BatchNorm2d(24)                                    # (e)
        self.conv_e = nn.Conv2d(24, 24, 3, padding=1, bias=False)
        self.relu_e = nn.ReLU()
        self.conv_f = nn.Conv2d(24, 32, 3, stride=2, padding=1, bias=True)  # (f)
        self.bn_f = nn.BatchNorm2d(32)
        self.relu_f = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc_g = nn.Linear(32, 16)                                     # (g)
        self.bn_g = nn.BatchNorm1d(16)
        self.relu_g = nn.ReLU()
        self.classifier = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu_a(self.fbn(x))
        x = self.relu_b(self.bn_b(self.conv_b(x)))
        x = self.relu_c(self.bn_c(self.conv_c(x)))
        x = self.relu_d(self.conv_d(self.bn_d(x)))
        x = self.relu_e(self.conv_e(self.bn_e(x)))
        x = self.relu_f(self.bn_f(self.conv_f(x)))
        x = torch.flatten(self.pool(x), 1)
        x = self.relu_g(self.bn_g(self.fc_g(x)))
        return self.classifier(x)


def special_tiny(num_classes: int = 10, in_channels: int = 3) -> SpecialNet:
    return SpecialNet(num_classes=num_classes, in_channels=in_channels)
