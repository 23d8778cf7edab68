"""What bnfold knows about layers: which modules are BatchNorms, producers and consumers.

Everything is described by *paths* (dotted attribute names from the model root) so that one folding routine
serves ``nn.Module`` trees, graphs from ``torch.export`` and TorchScript modules alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

LayerKind = Literal["conv", "conv_transpose", "linear"]

_BN_FORWARDS = {nn.modules.batchnorm._BatchNorm.forward, nn.SyncBatchNorm.forward}
_PRODUCER_TYPES: dict[type, LayerKind] = {
    nn.Conv1d: "conv",
    nn.Conv2d: "conv",
    nn.Conv3d: "conv",
    nn.ConvTranspose1d: "conv_transpose",
    nn.ConvTranspose2d: "conv_transpose",
    nn.ConvTranspose3d: "conv_transpose",
    nn.Linear: "linear",
}
_ACTIVATION_ATTRS = ("act", "activation", "act_fn", "nonlinearity")


@dataclass(frozen=True)
class Geometry:
    """Where a convolution's kernel reads its input, per spatial dimension (what branch merging compares)."""

    stride: tuple[int, ...]
    dilation: tuple[int, ...]
    pads: tuple[tuple[int, int], ...]  # (before, after) zeros per spatial dimension
    pad_mode: str = "zeros"  # torch's padding_mode; anything else pads with data, not zeros


@dataclass(frozen=True)
class LayerRef:
    """A Conv/ConvTranspose/Linear whose weights can absorb a BN."""

    name: str  # what the user sees: the module path, or the weight's path for a functional call
    kind: LayerKind
    weight: str  # attribute path of the weight from the root
    bias: str | None  # attribute path of the bias, None when the layer has none
    groups: int = 1
    padded: bool = False  # Conv only: pads its input (BN before it cannot fold)
    module: str | None = None  # module path when the layer is a module (a bias can be added to it)
    shape: tuple[int, ...] | None = None  # the weight's shape in torch's layout ((out, in/groups, *k) for Conv)
    geometry: Geometry | None = None  # Conv only, where the front-end knows it

    @property
    def out_channel_axis(self) -> int:
        return 1 if self.kind == "conv_transpose" else 0


@dataclass(frozen=True)
class BNRef:
    """One inference-mode BatchNorm, a module or a functional call on module-held tensors."""

    name: str
    mean: str | None  # attribute paths; None when the BN has no running statistics
    var: str | None
    weight: str | None  # None when affine=False
    bias: str | None
    eps: float
    module: str | None = None  # module path when the BN is a module
    plain: bool = True  # computes BN and nothing else (no activation inside)
    batch_stats: bool = False  # normalises with batch statistics even in eval


def producer_ref(name: str, module: nn.Module) -> LayerRef | None:
    """Describe ``module`` if it is a standard Conv/ConvTranspose/Linear (subclasses with their own forward are not)."""
    kind = next((k for t, k in _PRODUCER_TYPES.items() if isinstance(module, t) and type(module).forward is t.forward), None)
    if kind is None or not isinstance(getattr(module, "weight", None), torch.Tensor):
        return None
    groups = getattr(module, "groups", 1)
    padded = False
    geometry = None
    if kind == "conv":
        geometry = conv_geometry(module.kernel_size, module.stride, module.padding, module.dilation,
                                 module.padding_mode)
        padded = any(p != (0, 0) for p in geometry.pads)
    return LayerRef(
        name=name,
        kind=kind,
        weight=_join(name, "weight"),
        bias=_join(name, "bias") if module.bias is not None else None,
        groups=groups,
        padded=padded,
        module=name,
        shape=tuple(module.weight.shape),
        geometry=geometry,
    )


def conv_geometry(kernel: tuple[int, ...], stride, padding, dilation, pad_mode: str = "zeros") -> Geometry:
    """A torch convolution's geometry from its arguments (ints or per-dimension lists; padding may be a string)."""
    dims = len(kernel)

    def spread(value) -> tuple[int, ...]:
        return tuple(int(v) for v in value) if isinstance(value, (list, tuple)) else (int(value),) * dims

    stride, dilation = spread(stride), spread(dilation)
    if isinstance(padding, str):  # "valid": none; "same": torch puts the odd one after
        totals = [0 if padding == "valid" else d * (k - 1) for k, d in zip(kernel, dilation)]
        pads = tuple((t // 2, t - t // 2) for t in totals)
    else:
        pads = tuple((p, p) for p in spread(padding))
    return Geometry(stride, dilation, pads, pad_mode)


def is_frozen_bn(module: nn.Module) -> bool:
    """A torchvision-style FrozenBatchNorm: weight/bias/running stats as 1-D tensors and an ``eps``."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return False
    name = type(module).__name__.lower()
    if "batchnorm" not in name and "bn" not in name:
        return False
    tensors = [getattr(module, a, None) for a in ("weight", "bias", "running_mean", "running_var")]
    if not all(isinstance(t, torch.Tensor) and t.dim() == 1 for t in tensors):
        return False
    return len({t.numel() for t in tensors}) == 1 and isinstance(getattr(module, "eps", None), float)


def is_bn_module(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.batchnorm._BatchNorm) or is_frozen_bn(module)


def bn_ref(name: str, module: nn.Module) -> BNRef:
    """Describe a BN module (``is_bn_module(module)`` must hold)."""
    has_stats = getattr(module, "running_mean", None) is not None and getattr(module, "running_var", None) is not None
    tracks = getattr(module, "track_running_stats", True)
    affine = getattr(module, "weight", None) is not None
    plain = is_frozen_bn(module) or type(module).forward in _BN_FORWARDS
    return BNRef(
        name=name,
        mean=_join(name, "running_mean") if has_stats else None,
        var=_join(name, "running_var") if has_stats else None,
        weight=_join(name, "weight") if affine else None,
        bias=_join(name, "bias") if affine and getattr(module, "bias", None) is not None else None,
        eps=float(module.eps),
        module=name,
        plain=plain,
        batch_stats=not tracks or not has_stats,
    )


def bn_replacement(module: nn.Module) -> nn.Module | None:
    """The module that stands in for a folded BN: Identity, or what a BN subclass applies after normalising.

    Returns None when ``module`` overrides ``forward`` and bnfold cannot tell what else it computes.
    """
    if is_frozen_bn(module) or type(module).forward in _BN_FORWARDS:
        return nn.Identity()
    act = next((getattr(module, a) for a in _ACTIVATION_ATTRS if isinstance(getattr(module, a, None), nn.Module)), None)
    if act is None:
        return None
    drop = getattr(module, "drop", None)
    if isinstance(drop, nn.Module) and not isinstance(drop, nn.Identity):
        return nn.Sequential(drop, act)
    return act


def _join(prefix: str, attr: str) -> str:
    return f"{prefix}.{attr}" if prefix else attr


def get_tensor(root: nn.Module, path: str) -> torch.Tensor:
    """The parameter or buffer at ``path`` (``a.b.weight``) below ``root``."""
    module = root
    for part in path.split("."):  # getattr, not get_submodule: TorchScript modules do not support it
        module = getattr(module, part)
    value = module
    if not isinstance(value, torch.Tensor):
        raise KeyError(path)
    return value
