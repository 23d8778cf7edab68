"""The folding math, stated once. Pure functions of tensors: no modules, no files.

Inference-mode BatchNorm is a per-channel affine map::

    BN(z) = gamma * (z - mean) / sqrt(var + eps) + beta  =  s * z + t,
    s = gamma / sqrt(var + eps),   t = beta - s * mean.

*BN after a producer* ``y = W x + b`` (Conv, ConvTranspose, Linear) scales the producer's output channels::

    BN(W x + b) = (s * W) x + (s * (b - mean) + beta)

*BN before a consumer* ``y = W z + b`` (Linear, or a Conv that pads nothing) scales its input channels::

    W (s * z + t) + b = (W * s) z + (W t + b)

The second form is exact only when every output sees every input element through the same weights: a
padded Conv sees padded zeros that were never normalised, so it is not folded.

Only the position of the channel axis varies between layer kinds: output channels are axis 0 of a Conv or
Linear weight and axis 1 of a ConvTranspose weight (``(in, out/groups, *k)``), input channels the reverse.
With ``groups > 1`` the channel index is split into ``(group, channel-in-group)``; :func:`_channel_view`
handles that once for every case.

Precision: everything is computed in float64 and cast back to the weight's dtype recorded on entry, so fp16
and bf16 weights lose no more than one rounding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class BNParams:
    """Inference statistics of one BatchNorm. ``gamma``/``beta`` are None when ``affine=False``."""

    mean: Tensor
    var: Tensor
    eps: float
    gamma: Tensor | None = None
    beta: Tensor | None = None

    @property
    def num_features(self) -> int:
        return int(self.mean.numel())

    def channels(self, start: int, stop: int) -> BNParams:
        """The statistics of channels ``[start, stop)`` (a Concat operand's share)."""
        if not 0 <= start < stop <= self.num_features:
            raise ValueError(f"channels {start}:{stop} are not within the BatchNorm's {self.num_features} features")
        cut = (lambda t: None if t is None else t[start:stop])
        return BNParams(self.mean[start:stop], self.var[start:stop], self.eps, cut(self.gamma), cut(self.beta))

    def scale_shift(self) -> tuple[Tensor, Tensor]:
        """``(s, t)`` in float64 so that ``BN(z) = s * z + t``."""
        mean = self.mean.detach().to(torch.float64)
        var = self.var.detach().to(torch.float64)
        gamma = torch.ones_like(mean) if self.gamma is None else self.gamma.detach().to(torch.float64)
        beta = torch.zeros_like(mean) if self.beta is None else self.beta.detach().to(torch.float64)
        s = gamma / torch.sqrt(var + self.eps)
        return s, beta - s * mean


def _grouped(weight: Tensor, vector: Tensor, channel_axis: int, groups: int) -> tuple[Tensor, Tensor]:
    """View ``weight`` as ``(groups, d0/groups, d1, *k)`` and ``vector`` so it broadcasts on ``channel_axis``.

    Torch stacks groups along weight axis 0 for Conv (``(out, in/groups, *k)``) and ConvTranspose
    (``(in, out/groups, *k)``) alike, so a channel on axis 0 is ``c = g * d0/groups + i`` and a channel
    on axis 1 is ``c = g * d1 + j``. One reshape covers both (and ``groups == 1``).
    """
    d0, d1 = weight.shape[0], weight.shape[1]
    view = weight.reshape(groups, d0 // groups, d1, *weight.shape[2:])
    shape = [groups, 1, 1] + [1] * (weight.dim() - 2)
    shape[1 + channel_axis] = view.shape[1 + channel_axis]
    return view, vector.reshape(shape)


def _scale_channels(weight64: Tensor, scale: Tensor, channel_axis: int, groups: int) -> Tensor:
    """Multiply ``weight64`` by ``scale`` along its channel axis (groups aware)."""
    view, scale = _grouped(weight64, scale, channel_axis, groups)
    return (view * scale).reshape(weight64.shape)


def fold_bn_after(
    weight: Tensor,
    bias: Tensor | None,
    bn: BNParams,
    *,
    channel_axis: int = 0,
    groups: int = 1,
    shift: bool = True,
) -> tuple[Tensor, Tensor]:
    """Fold a BN that follows a producer ``y = W x + b`` into the producer's weight and bias.

    ``channel_axis`` is the producer weight's output-channel axis: 0 for Conv/Linear, 1 for
    ConvTranspose (then ``groups`` splits axis 0 into groups). ``shift=False`` folds the scale only
    (``s * W``, ``s * b``): the other operands of an Add before the BN, whose shift one operand takes.
    Returns ``(weight, bias)`` in the weight's dtype.
    """
    dtype = weight.dtype
    out_channels = weight.shape[channel_axis] * (groups if channel_axis == 1 else 1)
    if out_channels != bn.num_features:
        raise ValueError(
            f"producer has {out_channels} output channels but the BatchNorm has {bn.num_features} features"
        )
    s, t = bn.scale_shift()
    w64 = weight.detach().to(torch.float64)
    b64 = torch.zeros_like(s) if bias is None else bias.detach().to(torch.float64)
    new_w = _scale_channels(w64, s, channel_axis, groups)
    new_b = s * b64 + (t if shift else 0.0)  # = s * (b - mean) + beta
    return new_w.to(dtype), new_b.to(dtype)


def fold_bn_before(
    weight: Tensor,
    bias: Tensor | None,
    bn: BNParams,
    *,
    groups: int = 1,
) -> tuple[Tensor, Tensor]:
    """Fold a BN that precedes a consumer ``y = W z + b`` (Linear, or a Conv without padding).

    The consumer weight's input-channel axis is 1 (``(out, in/groups, *k)``). Returns ``(weight, bias)``
    in the weight's dtype.
    """
    dtype = weight.dtype
    in_channels = weight.shape[1] * groups
    if in_channels != bn.num_features:
        raise ValueError(
            f"consumer has {in_channels} input channels but the BatchNorm has {bn.num_features} features"
        )
    s, t = bn.scale_shift()
    w64 = weight.detach().to(torch.float64)
    b64 = torch.zeros(weight.shape[0], dtype=torch.float64) if bias is None else bias.detach().to(torch.float64)
    new_w = _scale_channels(w64, s, 1, groups)
    # W t: every output channel sums its weights against the constant shift of its input channels.
    view, shift = _grouped(w64, t, 1, groups)
    contribution = (view * shift).flatten(2).sum(-1).reshape(-1)
    return new_w.to(dtype), (b64 + contribution).to(dtype)


@dataclass(frozen=True)
class BranchTensors:
    """One operand of a re-parameterisable sum: ``BN(conv(x))``, ``conv(x)``, ``BN(x)`` or ``x``."""

    weight: Tensor | None  # None: the identity (a kernel of ones on each channel's own input)
    bias: Tensor | None
    bn: BNParams | None
    offsets: tuple[int, ...]  # where its kernel starts inside the merged kernel, per spatial dimension
    coefficient: Tensor | None = None  # what the branch is multiplied by in the sum: per channel, or one value


def merge_branches(shape: tuple[int, ...], groups: int, branches: list[BranchTensors],
                   dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """One conv computing the sum of ``branches`` (all with the same stride, dilation and groups): ``(W, b)``.

    Each branch is ``y_i = c_i * (s_i * (K_i * x + b_i) + t_i)`` (``s_i = 1, t_i = 0`` without a BN; ``K_i``
    the identity kernel for a branch without a conv; ``c_i`` its coefficient in the sum, per output channel:
    -1 for a subtracted branch, a layer scale); convolution is linear in its kernel, so
    ``sum y_i = (sum c_i * s_i * pad(K_i)) * x + sum c_i * (s_i * b_i + t_i)`` once every kernel is zero-padded
    to ``shape`` (``(out, in/groups, *k)``) at its offsets. Computed in float64, returned in ``dtype``.
    """
    out, per_group = shape[0], shape[1]
    weight = torch.zeros(shape, dtype=torch.float64)
    bias = torch.zeros(out, dtype=torch.float64)
    for branch in branches:
        if branch.weight is None:
            if per_group * groups != out:
                raise ValueError(f"an identity branch needs as many input as output channels ({per_group * groups} "
                                 f"-> {out})")
            kernel = torch.zeros((out, per_group) + (1,) * (len(shape) - 2), dtype=torch.float64)
            channel = torch.arange(out)
            kernel[(channel, channel % per_group) + (0,) * (len(shape) - 2)] = 1.0
        else:
            kernel = branch.weight.detach().to(torch.float64)
            if kernel.shape[:2] != torch.Size(shape[:2]):
                raise ValueError(f"a branch kernel of shape {tuple(kernel.shape)} does not merge into {shape}")
        b = torch.zeros(out, dtype=torch.float64) if branch.bias is None else branch.bias.detach().to(torch.float64)
        if branch.bn is not None:
            if branch.bn.num_features != out:
                raise ValueError(f"a branch BatchNorm has {branch.bn.num_features} features, the merged conv {out}")
            s, t = branch.bn.scale_shift()
            kernel = kernel * s.reshape((-1,) + (1,) * (kernel.dim() - 1))
            b = s * b + t
        if branch.coefficient is not None:
            c = branch.coefficient.detach().to(torch.float64).reshape(-1)
            if c.numel() not in (1, out):
                raise ValueError(f"a branch is scaled by {c.numel()} values, the merged conv has {out} channels")
            kernel = kernel * c.reshape((-1,) + (1,) * (kernel.dim() - 1))
            b = c * b
        window = (slice(None), slice(None)) + tuple(slice(o, o + k) for o, k in zip(branch.offsets, kernel.shape[2:]))
        if weight[window].shape != kernel.shape:
            raise ValueError(f"a branch kernel of shape {tuple(kernel.shape)} does not fit {shape} at {branch.offsets}")
        weight[window] += kernel
        bias += b
    return weight.to(dtype), bias.to(dtype)


def identity_statistics(num_features: int, eps: float, dtype: torch.dtype, shift: Tensor | None = None) -> BNParams:
    """Statistics that make a BatchNorm compute ``z + shift`` (``z`` when ``shift`` is None).

    Used where a BN cannot be removed from the graph (TorchScript, a functional call in ``forward``, a
    state dict that must keep its architecture): the folded scale lives in the producer and the BN is
    neutralised. BatchNorm kernels compute ``var + eps`` in float32 (float64 for double tensors), so
    ``var`` is the value whose sum with ``eps`` rounds to exactly 1 there: the BN is then an exact
    identity in fp32/fp64, and within one rounding of the stored value in fp16/bf16.
    """
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    one = torch.ones((), dtype=compute)
    eps_t = torch.tensor(eps, dtype=compute)
    var = one - eps_t
    for _ in range(8):  # at most a couple of ulps away
        total = var + eps_t
        if total == one:
            break
        var = torch.nextafter(var, torch.tensor(2.0 if total < one else 0.0, dtype=compute))
    zeros = torch.zeros(num_features, dtype=dtype)
    return BNParams(
        mean=zeros.clone(),
        var=torch.full((num_features,), float(var), dtype=compute).to(dtype),
        eps=eps,
        gamma=torch.ones(num_features, dtype=dtype),
        beta=zeros.clone() if shift is None else shift.detach().to(dtype).clone(),
    )
