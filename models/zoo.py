"""Registry of reference models for BN-folding tests.

``build(name, seed)`` returns a deterministic model in eval mode whose
BatchNorm-like layers carry non-trivial statistics, so that folding them is
actually exercised.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from models.audio import audio_tiny
from models.bn_act import bnact_tiny
from models.decoder import decoder_tiny
from models.densenet import densenet_tiny
from models.efficientnet import efficientnet_tiny
from models.mlp import mlp_tiny
from models.mobilenet import mobilenet_tiny
from models.reparam import (
    mixconv_tiny,
    mobileone_tiny,
    reparam_negatives_tiny,
    repvgg_tiny,
    residual_bn_tiny,
    same_pad_tiny,
)
from models.repmixer import repmixer_tiny
from models.resnet import resnet50, resnet_digits, resnet_tiny
from models.shared_output import shared_output_tiny
from models.special import special_tiny
from models.untraceable import untraceable_tiny
from models.video import video_tiny


@dataclass(frozen=True)
class ModelSpec:
    name: str
    factory: Callable[..., nn.Module]  # called with no arguments
    input_shape: tuple[int, ...]  # example input, including the batch dimension
    traceable: bool  # whether torch.fx.symbolic_trace works on the model


_SPECS = [
    ModelSpec("resnet_tiny", resnet_tiny, (2, 3, 32, 32), True),
    ModelSpec("resnet_digits", resnet_digits, (2, 1, 8, 8), True),
    ModelSpec("mobilenet_tiny", mobilenet_tiny, (2, 3, 32, 32), True),
    ModelSpec("densenet_tiny", densenet_tiny, (2, 3, 16, 16), True),
    ModelSpec("efficientnet_tiny", efficientnet_tiny, (2, 3, 32, 32), True),
    ModelSpec("decoder_tiny", decoder_tiny, (2, 8, 4, 4), True),
    ModelSpec("audio_tiny", audio_tiny, (2, 1, 256), True),
    ModelSpec("video_tiny", video_tiny, (2, 3, 4, 16, 16), True),
    ModelSpec("mlp_tiny", mlp_tiny, (2, 32), True),
    ModelSpec("untraceable_tiny", untraceable_tiny, (2, 3, 16, 16), False),
    ModelSpec("bnact_tiny", bnact_tiny, (2, 3, 16, 16), True),
    ModelSpec("shared_output_tiny", shared_output_tiny, (2, 3, 16, 16), True),
    ModelSpec("special_tiny", special_tiny, (2, 3, 16, 16), True),
    ModelSpec("repvgg_tiny", repvgg_tiny, (2, 3, 16, 16), True),
    ModelSpec("mobileone_tiny", mobileone_tiny, (2, 3, 16, 16), True),
    ModelSpec("mixconv_tiny", mixconv_tiny, (2, 3, 16, 16), True),
    ModelSpec("residual_bn_tiny", residual_bn_tiny, (2, 3, 16, 16), True),
    # Conv2dSame pads from x.shape in Python: symbolic_trace fails, torch.export works.
    ModelSpec("same_pad_tiny", same_pad_tiny, (2, 3, 16, 16), False),
    ModelSpec("reparam_negatives_tiny", reparam_negatives_tiny, (2, 3, 16, 16), True),
    ModelSpec("repmixer_tiny", repmixer_tiny, (2, 3, 16, 16), True),
]

REFERENCE_MODELS: dict[str, ModelSpec] = {spec.name: spec for spec in _SPECS}

# Too large for the regular test suite; built on demand.
RESNET50 = ModelSpec("resnet50", resnet50, (1, 3, 224, 224), True)


def _is_bn_like(module: nn.Module) -> bool:
    """Any module that directly owns ``running_mean`` and ``running_var`` tensors.

    Covers nn.BatchNorm1d/2d/3d, nn.SyncBatchNorm, BatchNormAct2d, FrozenBatchNorm2d
    and modules that call F.batch_norm on their own tensors.
    """
    return isinstance(getattr(module, "running_mean", None), torch.Tensor) and isinstance(
        getattr(module, "running_var", None), torch.Tensor
    )


@torch.no_grad()
def randomize_bn_statistics(model: nn.Module, generator: torch.Generator) -> nn.Module:
    """Give every BatchNorm-like layer deterministic, non-trivial statistics (in place).

    running_mean ~ N(0, 0.5), running_var ~ U(0.5, 2.0), weight ~ U(0.5, 1.5),
    bias ~ N(0, 0.2) (weight/bias skipped when absent, e.g. affine=False),
    num_batches_tracked = 100 where present.
    """
    for module in model.modules():
        if not _is_bn_like(module):
            continue
        mean, var = module.running_mean, module.running_var
        n = mean.numel()
        mean.copy_((torch.randn(n, generator=generator) * 0.5).view_as(mean))
        var.copy_((torch.rand(n, generator=generator) * 1.5 + 0.5).view_as(var))
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor):
            weight.copy_((torch.rand(n, generator=generator) + 0.5).view_as(weight))
        bias = getattr(module, "bias", None)
        if isinstance(bias, torch.Tensor):
            bias.copy_((torch.randn(n, generator=generator) * 0.2).view_as(bias))
        tracked = getattr(module, "num_batches_tracked", None)
        if isinstance(tracked, torch.Tensor):
            tracked.fill_(100)
    return model


def get_spec(name: str) -> ModelSpec:
    if name == RESNET50.name:
        return RESNET50
    try:
        return REFERENCE_MODELS[name]
    except KeyError:
        known = ", ".join([*REFERENCE_MODELS, RESNET50.name])
        raise KeyError(f"unknown model {name!r}; known: {known}") from None


def build(name: str, seed: int = 0) -> nn.Module:
    """Build a registered model (``resnet50`` included) deterministically, in eval mode."""
    spec = get_spec(name)
    # fork_rng keeps the caller's global RNG state untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = spec.factory()
    generator = torch.Generator().manual_seed(seed)
    randomize_bn_statistics(model, generator)
    return model.eval()
