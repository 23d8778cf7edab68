"""Apply folds to a model in place, through the paths in :class:`~bnfold.layers.LayerRef`/``BNRef``.

The math is :mod:`bnfold.fold.math`; this module reads tensors, writes the results back with their dtype,
device and ``requires_grad`` kept, and takes the BN out of the computation. How a BN is taken out depends on
the host: an ``nn.Module`` tree swaps the module for ``Identity`` (or the activation a BN subclass
applied), a ``torch.export`` graph erases the node, and where neither is possible (a functional call in
``forward``, TorchScript) the BN is *neutralised*: its statistics are set so it computes exactly ``z``.

A host reads and writes tensors by path through ``get(path)``, ``set(path, value)`` and ``dtype(path)`` (the
dtype the tensor is stored in). A host may present a tensor in another layout or precision than it stores
(an ONNX Gemm's ``(K, N)`` weight as torch's ``(N, K)``, in float64): ``set`` translates back, and the overflow
check below casts to ``dtype(path)`` first, so it judges the values as they will be stored.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Protocol

import torch
from torch import nn

from bnfold.discover.fx import bn_output
from bnfold.discover.graph import Fold
from bnfold.fold.math import BNParams, fold_bn_after, fold_bn_before, identity_statistics
from bnfold.layers import BNRef, LayerRef, bn_replacement, get_tensor


class CannotFold(Exception):
    """A fold that discovery proposed but the tensors refuse; the message is the user-facing reason."""


class TensorHost(Protocol):
    """What :func:`apply_fold` needs of a model: tensors by path, a bias where there is none, the BN taken out."""

    def claim(self, fold: Fold) -> Fold: ...
    def get(self, path: str) -> torch.Tensor: ...
    def set(self, path: str, value: torch.Tensor) -> None: ...
    def dtype(self, path: str) -> torch.dtype: ...
    def check(self, fold: Fold) -> None: ...
    def add_bias(self, layer: LayerRef) -> str | None: ...
    def remove_bn(self, ref: BNRef) -> None: ...


def bn_params(host: TensorHost, ref: BNRef) -> BNParams:
    if ref.mean is None or ref.var is None:
        raise CannotFold("has no running statistics")
    params = BNParams(
        mean=host.get(ref.mean),
        var=host.get(ref.var),
        eps=ref.eps,
        gamma=host.get(ref.weight) if ref.weight else None,
        beta=host.get(ref.bias) if ref.bias else None,
    )
    for label, t in (("running_mean", params.mean), ("running_var", params.var), ("weight", params.gamma),
                     ("bias", params.beta)):
        if t is not None and not torch.isfinite(t).all():
            bad = int((~torch.isfinite(t)).nonzero()[0, 0])
            raise CannotFold(f"{label} is not finite (channel {bad} = {t.flatten()[bad].item()}): the statistics "
                             "are broken, re-estimate them before folding")
    if not math.isfinite(params.eps):
        raise CannotFold(f"epsilon is not finite ({params.eps}): the BN is broken, re-export it")
    if (params.var + params.eps < 0).any():
        raise CannotFold("running_var + eps is negative")
    return params


def write(root: nn.Module, path: str, value: torch.Tensor) -> None:
    """Overwrite the tensor at ``path`` in place, keeping its dtype and device."""
    target = get_tensor(root, path)
    with torch.no_grad():
        target.copy_(value.to(device=target.device, dtype=target.dtype))


class ModuleHost:
    """An ``nn.Module`` tree: a folded BN module is replaced by Identity or its activation."""

    def __init__(self, root: nn.Module) -> None:
        self.root = root

    def get(self, path: str) -> torch.Tensor:
        return get_tensor(self.root, path)

    def set(self, path: str, value: torch.Tensor) -> None:
        write(self.root, path, value)

    def dtype(self, path: str) -> torch.dtype:
        return get_tensor(self.root, path).dtype

    def check(self, fold: Fold) -> None:
        """Raise :class:`CannotFold` before anything is written, if this host cannot take ``fold``."""
        if fold.bn.module is not None and not fold.bn.plain and bn_replacement(self.root.get_submodule(fold.bn.module)) is None:
            cls = type(self.root.get_submodule(fold.bn.module)).__name__
            raise CannotFold(f"{cls} overrides forward() and has no activation attribute (act/activation): bnfold "
                             "cannot tell what else it computes")

    def claim(self, fold: Fold) -> Fold:
        """``fold`` with its layer's current tensors: an earlier fold into the same layer (BN -> conv -> BN) may
        have given it the bias it had no room for at discovery time."""
        layer = fold.layer
        if layer.bias is None and layer.module is not None:
            bias = getattr(self.root.get_submodule(layer.module), "bias", None)
            if isinstance(bias, torch.Tensor):
                return dataclasses.replace(fold, layer=dataclasses.replace(layer, bias=f"{layer.module}.bias"))
        return fold

    def add_bias(self, layer: LayerRef) -> str | None:
        """Give ``layer`` a zero bias and return its path, or None when the host cannot."""
        if layer.module is None:
            return None
        module = self.root.get_submodule(layer.module)
        weight = module.weight
        out = weight.shape[1] * layer.groups if layer.kind == "conv_transpose" else weight.shape[0]
        module.bias = nn.Parameter(torch.zeros(out, dtype=weight.dtype, device=weight.device),
                                   requires_grad=weight.requires_grad)
        return f"{layer.module}.bias"

    def remove_bn(self, ref: BNRef) -> None:
        if ref.module is None:
            neutralise(self, ref)
            return
        parent_name, _, child = ref.module.rpartition(".")
        parent = self.root.get_submodule(parent_name) if parent_name else self.root
        replacement = bn_replacement(self.root.get_submodule(ref.module))
        assert replacement is not None, "check() rejects BNs without a replacement"
        setattr(parent, child, replacement)


def neutralise(host: TensorHost, ref: BNRef, shift: torch.Tensor | None = None) -> None:
    """Make the BN at ``ref`` compute ``z + shift``; it needs an affine BN to hold a shift."""
    identity = identity_statistics(host.get(ref.mean).numel(), ref.eps, host.dtype(ref.mean), shift)
    host.set(ref.mean, identity.mean)
    host.set(ref.var, identity.var)
    if ref.weight is not None:
        host.set(ref.weight, identity.gamma)
    if ref.bias is not None:
        host.set(ref.bias, identity.beta)


def apply_fold(host: TensorHost, fold: Fold) -> None:
    """Fold one BN into its layer and take the BN out of the computation."""
    layer, ref = fold.layer, fold.bn
    params = bn_params(host, ref)
    host.check(fold)
    weight = host.get(layer.weight)
    bias = host.get(layer.bias) if layer.bias else None
    for label, tensor in (("weight", weight), ("bias", bias)):
        if tensor is not None and not torch.isfinite(tensor).all():
            raise CannotFold(f"the {label} of {layer.name} is not finite (NaN/Inf): it is broken before any folding")
    try:
        if fold.position == "after":
            groups = layer.groups if layer.kind == "conv_transpose" else 1
            new_w, new_b = fold_bn_after(weight, bias, params, channel_axis=layer.out_channel_axis, groups=groups)
        else:
            new_w, new_b = fold_bn_before(weight, bias, params, groups=layer.groups)
    except ValueError as exc:  # channel counts disagree: discovery paired the wrong tensors
        raise CannotFold(str(exc)) from None
    stored = host.dtype(layer.weight)
    if not (torch.isfinite(new_w.to(stored)).all() and torch.isfinite(new_b.to(stored)).all()):
        limit = torch.finfo(stored).max
        raise CannotFold(f"folded weights of {layer.name} overflow {str(stored).removeprefix('torch.')} (max "
                         f"{limit:.6g}): a tiny running_var magnifies them; keep this BN, or fold in float32")
    bias_path = layer.bias or host.add_bias(layer)
    if bias_path is None and (fold.position == "before" or ref.bias is None):
        where = "the BN is not affine" if fold.position == "after" else "a BN before it cannot hold its shift"
        raise CannotFold(f"{layer.name} has no bias and {where}: nowhere to keep the folded shift")
    host.set(layer.weight, new_w)
    if bias_path is not None:
        host.set(bias_path, new_b)
        host.remove_bn(ref)
    else:  # BN after a bias-less layer: the BN keeps only the shift
        neutralise(host, ref, shift=new_b)


class KeepStructureHost(ModuleHost):
    """Keep every module and state-dict key: BNs are neutralised (identity statistics), no bias is added.

    A producer without a bias leaves the folded shift in its BN, so the state dict loads into the
    unchanged architecture.
    """

    def add_bias(self, layer: LayerRef) -> str | None:
        return None

    def remove_bn(self, ref: BNRef) -> None:
        neutralise(self, ref)


class ScriptHost(KeepStructureHost):
    """A TorchScript module: its graph is compiled, so BNs are neutralised in place (exact in fp32)."""

    def check(self, fold: Fold) -> None:
        pass  # the scripted forward keeps whatever a BN subclass applies after normalising


class GraphHost(ModuleHost):
    """A ``GraphModule`` from ``torch.export``: BN nodes are erased and missing biases become attributes."""

    def check(self, fold: Fold) -> None:
        pass

    def _node(self, attr_arg: int, path: str):
        for node in self.root.graph.nodes:
            if node.op == "call_function" and any(getattr(a, "target", None) == path for a in node.args[attr_arg:attr_arg + 4]):
                return node
        raise CannotFold(f"no graph node reads {path}")

    def add_bias(self, layer: LayerRef) -> str | None:
        gm = self.root
        node = self._node(1, layer.weight)
        weight = get_tensor(gm, layer.weight)
        out = weight.shape[1] * layer.groups if layer.kind == "conv_transpose" else weight.shape[0]
        name = f"_bnfold_bias_{len([n for n, _ in gm.named_parameters() if n.startswith('_bnfold_bias_')])}"
        gm.register_parameter(name, nn.Parameter(torch.zeros(out, dtype=weight.dtype), requires_grad=False))
        with gm.graph.inserting_before(node):
            attr = gm.graph.get_attr(name)
        if "bias" in node.kwargs:
            node.kwargs = {**node.kwargs, "bias": attr}
        else:
            args = list(node.args) + [None] * max(0, 3 - len(node.args))
            args[2] = attr
            node.args = tuple(args)
        gm.recompile()
        return name

    def remove_bn(self, ref: BNRef) -> None:
        gm = self.root
        node = self._node(1, ref.mean)
        out = bn_output(node)
        out.replace_all_uses_with(node.args[0])
        if out is not node:
            gm.graph.erase_node(out)
        for user in list(node.users):  # the unused statistics outputs of tuple-returning ops
            gm.graph.erase_node(user)
        gm.graph.erase_node(node)
        gm.recompile()
