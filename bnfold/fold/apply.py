"""Apply a fold plan through a tensor host: the algorithm, for every model kind.

The math is :mod:`bnfold.fold.math`; this module reads tensors through a host, checks them, writes the results
back and asks the host to take the BN out of the computation. The hosts are the kinds' own (see
:mod:`bnfold.kinds`): an ``nn.Module`` tree swaps the module for ``Identity`` (or the activation a BN subclass
applied), a ``torch.export`` graph erases the node, an ONNX graph drops it, and where none of that is possible
(a functional call in ``forward``, TorchScript) the BN is *neutralised*: its statistics are set so it computes
exactly ``z`` (:func:`neutralise`).

Structural folds (:mod:`bnfold.discover.rules`) go through the same host: a BN after a Concat or an Add is
written into several layers (:func:`_apply_parts`), and a merge of branches (:func:`apply_merge`) writes the
merged kernel into one conv and asks the host to rewrite its graph (``merge``): an fx ``GraphModule`` (traced
eager models, ``torch.export`` programs) or an ONNX graph; hosts without a graph refuse with a reason.
:func:`apply_plan` applies a whole plan, each merge once.

A host reads and writes tensors by path through ``get(path)``, ``set(path, value)`` and ``dtype(path)`` (the
dtype the tensor is stored in). A host may present a tensor in another layout or precision than it stores
(an ONNX Gemm's ``(K, N)`` weight as torch's ``(N, K)``, in float64): ``set`` translates back, and the overflow
check below casts to ``dtype(path)`` first, so it judges the values as they will be stored.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar, Protocol

import torch

from bnfold.discover.graph import Fold, Merge, Skip
from bnfold.fold.math import BNParams, BranchTensors, fold_bn_after, fold_bn_before, identity_statistics, merge_branches
from bnfold.inputs import dtype_name
from bnfold.layers import BNRef, LayerRef


class CannotFold(Exception):
    """A fold that discovery proposed but the tensors refuse; the message is the user-facing reason."""


class TensorHost(Protocol):
    """What :func:`apply_plan` needs of a model: tensors by path, a bias where there is none, the BN taken out,
    and for :func:`apply_merge` a graph rewrite (``merge`` raises :class:`CannotFold` before changing anything).

    ``rewrites``: the host may be handed the model's traced graph instead of the model (a torch host whose
    merges and functional-call biases rewrite a ``GraphModule``). ``finish()`` is called once after the plan is
    applied: the host tidies what folding left (an ONNX graph drops initializers nothing reads any more)."""

    rewrites: ClassVar[bool]

    def claim_layer(self, layer: LayerRef) -> LayerRef: ...
    def get(self, path: str) -> torch.Tensor: ...
    def set(self, path: str, value: torch.Tensor) -> None: ...
    def dtype(self, path: str) -> torch.dtype: ...
    def check(self, fold: Fold) -> None: ...
    def add_bias(self, layer: LayerRef) -> str | None: ...
    def remove_bn(self, ref: BNRef) -> None: ...
    def merge(self, merge: Merge) -> None: ...
    def finish(self) -> None: ...


def claim(host: TensorHost, fold: Fold) -> Fold:
    """``fold`` with the current tensors of every layer it writes (see the hosts' ``claim_layer``)."""
    parts = tuple(dataclasses.replace(p, layer=host.claim_layer(p.layer)) for p in fold.parts)
    layer = parts[0].layer if parts else host.claim_layer(fold.layer)
    return dataclasses.replace(fold, layer=layer, parts=parts)


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


def neutralise(host: TensorHost, ref: BNRef, shift: torch.Tensor | None = None) -> None:
    """Make the BN at ``ref`` compute ``z + shift``; it needs an affine BN to hold a shift."""
    identity = identity_statistics(host.get(ref.mean).numel(), ref.eps, host.dtype(ref.mean), shift)
    host.set(ref.mean, identity.mean)
    host.set(ref.var, identity.var)
    if ref.weight is not None:
        host.set(ref.weight, identity.gamma)
    if ref.bias is not None:
        host.set(ref.bias, identity.beta)


def _layer_tensors(host: TensorHost, layer: LayerRef) -> tuple[torch.Tensor, torch.Tensor | None]:
    weight = host.get(layer.weight)
    bias = host.get(layer.bias) if layer.bias else None
    for label, tensor in (("weight", weight), ("bias", bias)):
        if tensor is not None and not torch.isfinite(tensor).all():
            raise CannotFold(f"the {label} of {layer.name} is not finite (NaN/Inf): it is broken before any folding")
    return weight, bias


def _check_stored(host: TensorHost, layer: LayerRef, *tensors: torch.Tensor) -> None:
    stored = host.dtype(layer.weight)
    if not all(torch.isfinite(t.to(stored)).all() for t in tensors):
        limit = torch.finfo(stored).max
        raise CannotFold(f"folded weights of {layer.name} overflow {dtype_name(stored)} (max "
                         f"{limit:.6g}): a tiny running_var magnifies them; keep this BN, or fold in float32")


def apply_plan(host: TensorHost, folds: list[Fold], merges: list[Merge] = ()) -> tuple[list[Fold], list[Skip]]:
    """Apply ``merges`` (each once, before anything folds into a merged conv), then ``folds`` in order, then
    ``host.finish()``: what was applied, and what the tensors or the host refused, each with its reason. A fold
    whose merge is not in ``merges`` applies that merge when it comes."""
    applied: list[Fold] = []
    refused: list[Skip] = []
    done: dict[Merge, str | None] = {}  # merge -> why it was refused (None: done)

    def merge_once(merge: Merge) -> str | None:
        if merge not in done:
            try:
                apply_merge(host, merge)
                done[merge] = None
            except CannotFold as exc:
                done[merge] = str(exc)
        return done[merge]

    for merge in merges:
        merge_once(merge)
    for fold in folds:
        try:
            if fold.merge is not None:
                why = merge_once(fold.merge)
                if why is not None:
                    raise CannotFold(why)
            else:
                failed = next((m for m, why in done.items() if why and m.target in fold.layers), None)
                if failed is not None:
                    raise CannotFold(f"{failed.target.name} was to be the merge of {failed.label}, which did not happen")
                apply_fold(host, claim(host, fold))
        except CannotFold as exc:
            refused.append(Skip(fold.bn.name, str(exc), "refused"))
        else:
            applied.append(fold)
    host.finish()
    return applied, refused


def apply_merge(host: TensorHost, merge: Merge) -> None:
    """Merge the branches of ``merge`` into its target conv and take the rest out of the graph."""
    target = host.claim_layer(merge.target)
    branches = []
    for branch in merge.branches:
        layer = target if branch.layer == merge.target else branch.layer
        weight, bias = _layer_tensors(host, layer) if layer is not None else (None, None)
        params = bn_params(host, branch.bn) if branch.bn is not None else None
        coefficient = torch.full((1,), float(branch.sign), dtype=torch.float64)
        for factor in branch.factors:  # a layer scale on the way to the sum: one value per channel, or one
            value = host.get(factor.path) if factor.path is not None else torch.tensor(factor.value)
            value = value.detach().to(torch.float64).reshape(-1)
            if not torch.isfinite(value).all():
                raise CannotFold(f"the scale {factor.path} on a branch of {merge.label} is not finite (NaN/Inf)")
            if coefficient.numel() != 1 and value.numel() not in (1, coefficient.numel()):
                raise CannotFold(f"the scales on a branch of {merge.label} disagree in size")
            coefficient = coefficient * value
        branches.append(BranchTensors(weight, bias, params, branch.offsets, coefficient))
    weight = host.get(target.weight)
    try:
        new_w, new_b = merge_branches(tuple(weight.shape), target.groups, branches, weight.dtype)
    except ValueError as exc:
        raise CannotFold(str(exc)) from None
    _check_stored(host, target, new_w, new_b)
    bias_path = target.bias or host.add_bias(target)
    if bias_path is None:
        raise CannotFold(f"{target.name} has no bias and bnfold cannot give it one: nowhere to keep the merged shift")
    host.merge(merge)
    host.set(target.weight, new_w)
    host.set(bias_path, new_b)


def apply_fold(host: TensorHost, fold: Fold) -> None:
    """Fold one BN into its layer (or the layers in ``fold.parts``) and take the BN out of the computation.
    ``fold`` comes from :func:`claim`; merges go through :func:`apply_merge`."""
    if fold.parts:
        _apply_parts(host, fold)
        return
    layer, ref = fold.layer, fold.bn
    params = bn_params(host, ref)
    host.check(fold)
    weight, bias = _layer_tensors(host, layer)
    try:
        if fold.position == "after":
            groups = layer.groups if layer.kind == "conv_transpose" else 1
            new_w, new_b = fold_bn_after(weight, bias, params, channel_axis=layer.out_channel_axis, groups=groups)
        else:
            new_w, new_b = fold_bn_before(weight, bias, params, groups=layer.groups)
    except ValueError as exc:  # channel counts disagree: discovery paired the wrong tensors
        raise CannotFold(str(exc)) from None
    _check_stored(host, layer, new_w, new_b)
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


def _apply_parts(host: TensorHost, fold: Fold) -> None:
    """A BN after a Concat (each part absorbs its channels) or an Add (each part the scale, one the shift)."""
    params = bn_params(host, fold.bn)
    host.check(fold)
    results = []
    for part in fold.parts:
        layer = part.layer
        weight, bias = _layer_tensors(host, layer)
        try:
            share = params.channels(*part.channels) if part.channels is not None else params
            groups = layer.groups if layer.kind == "conv_transpose" else 1
            new_w, new_b = fold_bn_after(weight, bias, share, channel_axis=layer.out_channel_axis, groups=groups,
                                         shift=part.shift)
        except ValueError as exc:
            raise CannotFold(f"{layer.name}: {exc}") from None
        _check_stored(host, layer, new_w, new_b)
        results.append((layer, new_w, new_b, bias is not None or part.shift))
    # A zero bias changes nothing, so biases are given first. A layer that cannot get one (a host that keeps
    # the structure) leaves its share of the shift in the BN, which then computes z + shift.
    biases: dict[LayerRef, str | None] = {}
    leftover = torch.zeros(params.num_features, dtype=torch.float64)
    for part, (layer, _, new_b, needs_bias) in zip(fold.parts, results):
        if needs_bias:
            biases[layer] = layer.bias or host.add_bias(layer)
            if biases[layer] is None:
                leftover[slice(*part.channels) if part.channels else slice(None)] += new_b.to(torch.float64)
    if biases and None in biases.values() and fold.bn.bias is None:
        raise CannotFold("a layer has no bias and the BN is not affine: nowhere to keep the folded shift")
    for layer, new_w, new_b, needs_bias in results:
        host.set(layer.weight, new_w)
        if needs_bias and biases[layer] is not None:
            host.set(biases[layer], new_b)
    if None in biases.values():
        neutralise(host, fold.bn, shift=leftover)
    else:
        host.remove_bn(fold.bn)
