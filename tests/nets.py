"""Small torch models and inputs shared by the tests of several commands: a conv/BN net on 3x8x8 inputs."""

from __future__ import annotations

import torch
from torch import nn

from models.zoo import randomize_bn_statistics

#: Four seeded 3x8x8 inputs.
X = (torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0)),)


def _net(trained: bool) -> nn.Module:
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                          nn.Linear(4 * 8 * 8, 3))
    if trained:
        randomize_bn_statistics(model, torch.Generator().manual_seed(0))
    return model.eval()


def net() -> nn.Module:
    """The net with learned-looking statistics (``--arch tests.nets:net`` builds it too)."""
    return _net(True)


def nonfinite_models():
    inf_weight = net()
    with torch.no_grad():
        inf_weight[0].weight[0, 0, 0, 0] = float("inf")
    zero_var = net()
    zero_var[1].running_var[1] = 0.0
    zero_var[1].eps = 0.0
    with torch.no_grad():
        zero_var[1].running_mean[1] = 0.0
        zero_var[0].bias[1] = 1.0  # the channel's input is never exactly the mean: (x - 0) / 0 = inf
    return {"inf weight": (inf_weight, "0"), "zero variance without eps": (zero_var, "1")}
