"""Apply folds to a model in place, through the paths in :class:`~bnfold.layers.LayerRef`/``BNRef``.

The math is :mod:`bnfold.fold.math`; this module reads tensors, writes the results back with their dtype,
device and ``requires_grad`` kept, and takes the BN out of the computation. How a BN is taken out depends on
the host: an ``nn.Module`` tree swaps the module for ``Identity`` (or the activation a BN subclass
applied), a ``torch.export`` graph erases the node, and where neither is possible (a functional call in
``forward``, TorchScript) the BN is *neutralised*: its statistics are set so it computes exactly ``z``.

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
import operator
from typing import Protocol

import torch
from torch import fx, nn

from bnfold.discover.fx import bn_output, constant_nodes
from bnfold.discover.graph import Fold, Merge, Skip
from bnfold.fold.math import BNParams, BranchTensors, fold_bn_after, fold_bn_before, identity_statistics, merge_branches
from bnfold.inputs import dtype_name
from bnfold.layers import BNRef, LayerRef, bn_replacement, get_tensor


class CannotFold(Exception):
    """A fold that discovery proposed but the tensors refuse; the message is the user-facing reason."""


class TensorHost(Protocol):
    """What :func:`apply_fold` needs of a model: tensors by path, a bias where there is none, the BN taken out,
    and for :func:`apply_merge` a graph rewrite (``merge`` raises :class:`CannotFold` before changing anything)."""

    def claim_layer(self, layer: LayerRef) -> LayerRef: ...
    def get(self, path: str) -> torch.Tensor: ...
    def set(self, path: str, value: torch.Tensor) -> None: ...
    def dtype(self, path: str) -> torch.dtype: ...
    def check(self, fold: Fold) -> None: ...
    def add_bias(self, layer: LayerRef) -> str | None: ...
    def remove_bn(self, ref: BNRef) -> None: ...
    def merge(self, merge: Merge) -> None: ...


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


def write(root: nn.Module, path: str, value: torch.Tensor) -> None:
    """Overwrite the tensor at ``path`` in place, keeping its dtype and device."""
    target = get_tensor(root, path)
    with torch.no_grad():
        target.copy_(value.to(device=target.device, dtype=target.dtype))


class ModuleHost:
    """An ``nn.Module`` tree: a folded BN module is replaced by Identity or its activation.

    Given a ``GraphModule`` it also rewrites the graph: merges, and biases for functional calls."""

    rewrites = True  # may be handed the traced graph of the model instead of the model

    def __init__(self, root: nn.Module) -> None:
        self.root = root
        self._graph_biases: dict[str, str] = {}  # weight path -> bias attribute added to its functional call
        self._names: dict[int, list[str]] | None = None  # id(tensor) -> every path naming it

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

    def claim_layer(self, layer: LayerRef) -> LayerRef:
        """``layer`` with its current tensors: an earlier fold into the same layer (BN -> conv -> BN) may have
        given it the bias it had no room for at discovery time. A tensor that another path names too (tied
        weights) is refused: writing it would change the other layer."""
        for role, path in (("weight", layer.weight), ("bias", layer.bias)):
            names = self._aliases().get(id(get_tensor(self.root, path)), []) if path else []
            if len(names) > 1:
                other = next(n for n in names if n != path)
                raise CannotFold(f"the {role} of {layer.name} is the same tensor as {other} (tied weights): folding "
                                 "would change both")
        if layer.bias is None and layer.module is not None:
            bias = getattr(self.root.get_submodule(layer.module), "bias", None)
            if isinstance(bias, torch.Tensor):
                return dataclasses.replace(layer, bias=f"{layer.module}.bias")
        if layer.bias is None and layer.module is None and isinstance(self.root, fx.GraphModule):
            added = self._graph_biases.get(layer.weight)
            if added is not None:
                return dataclasses.replace(layer, bias=added)
        return layer

    def _aliases(self) -> dict[int, list[str]]:
        if self._names is None:
            self._names = {}
            for name, tensor in [*self.root.named_parameters(remove_duplicate=False),
                                 *self.root.named_buffers(remove_duplicate=False)]:
                self._names.setdefault(id(tensor), []).append(name)
        return self._names

    def merge(self, merge: Merge) -> None:
        """Rewrite the graph: the merged conv takes the place of the Add, the other branches go."""
        if not isinstance(self.root, fx.GraphModule):
            raise CannotFold("merging branches rewrites the forward, and this model has no graph to rewrite")
        merge_in_graph(self.root, merge)

    def add_bias(self, layer: LayerRef) -> str | None:
        """Give ``layer`` a zero bias and return its path, or None when the host cannot."""
        if layer.module is None:
            if not isinstance(self.root, fx.GraphModule):
                return None
            path = graph_add_bias(self.root, layer)
            self._graph_biases[layer.weight] = path
            return path
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
    """Apply ``merges`` (each once, before anything folds into a merged conv), then ``folds`` in order: what was
    applied, and what the tensors or the host refused, each with its reason. A fold whose merge is not in
    ``merges`` applies that merge when it comes."""
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
            refused.append(Skip(fold.bn.name, str(exc)))
        else:
            applied.append(fold)
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


class KeepStructureHost(ModuleHost):
    """Keep every module and state-dict key: BNs are neutralised (identity statistics), no bias is added.

    A producer without a bias leaves the folded shift in its BN, so the state dict loads into the
    unchanged architecture.
    """

    rewrites = False

    def add_bias(self, layer: LayerRef) -> str | None:
        return None

    def remove_bn(self, ref: BNRef) -> None:
        neutralise(self, ref)

    def merge(self, merge: Merge) -> None:
        raise CannotFold("merging branches changes the architecture, and this model keeps its structure")


class ScriptHost(KeepStructureHost):
    """A TorchScript module: its graph is compiled, so BNs are neutralised in place (exact in fp32)."""

    def check(self, fold: Fold) -> None:
        pass  # the scripted forward keeps whatever a BN subclass applies after normalising


class GraphHost(ModuleHost):
    """A ``GraphModule`` from ``torch.export``: BN nodes are erased and missing biases become attributes."""

    def check(self, fold: Fold) -> None:
        pass

    def _node(self, attr_arg: int, path: str):
        return _reader(self.root, attr_arg, path)

    def remove_bn(self, ref: BNRef) -> None:
        gm = self.root
        node = self._node(1, ref.mean)
        out = bn_output(node)
        out.replace_all_uses_with(node.args[0])
        if out is not node:
            gm.graph.erase_node(out)
        for user in list(node.users):  # the unused statistics outputs of tuple-returning ops
            gm.graph.erase_node(user)
        constants = _constant_inputs({node})
        owner = (ref.mean or "").rpartition(".")[0]
        gm.graph.erase_node(node)
        for stale in reversed(list(gm.graph.nodes)):  # the BN's tensors (num_batches_tracked too): not carried on
            if not stale.users and (stale in constants or (owner and stale.op == "get_attr" and
                                                           str(stale.target).startswith(owner + "."))):
                gm.graph.erase_node(stale)
        gm.delete_all_unused_submodules()
        gm.recompile()


def _reader(gm: fx.GraphModule, attr_arg: int, path: str) -> fx.Node:
    """The call reading attribute ``path`` among its arguments ``attr_arg`` to ``attr_arg + 3``."""
    for node in gm.graph.nodes:
        if node.op == "call_function" and any(getattr(a, "target", None) == path for a in node.args[attr_arg:attr_arg + 4]):
            return node
    raise CannotFold(f"no graph node reads {path}")


def graph_add_bias(gm: fx.GraphModule, layer: LayerRef) -> str:
    """A zero bias attribute for the functional conv/linear call reading ``layer.weight``; returns its path."""
    node = _reader(gm, 1, layer.weight)
    weight = get_tensor(gm, layer.weight)
    out = weight.shape[1] * layer.groups if layer.kind == "conv_transpose" else weight.shape[0]
    name = f"_bnfold_bias_{len([n for n, _ in gm.named_parameters() if n.startswith('_bnfold_bias_')])}"
    gm.register_parameter(name, nn.Parameter(torch.zeros(out, dtype=weight.dtype, device=weight.device),
                                             requires_grad=False))
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


def merge_in_graph(gm: fx.GraphModule, merge: Merge) -> None:
    """The graph side of a merge: the target conv's output replaces the Add's, and the Add tree, the other
    convs and the BNs are erased with the attributes only they read. Checks everything before changing anything."""
    by_name = {n.name: n for n in gm.graph.nodes}
    missing = [name for name in (merge.root, merge.target_node, *merge.removed) if name not in by_name]
    if missing:
        raise CannotFold(f"the graph has no node {missing[0]} any more")
    root, target = by_name[merge.root], by_name[merge.target_node]
    doomed = {root, *(by_name[name] for name in merge.removed)}
    doomed |= {u for n in list(doomed) for u in n.users if u.target is operator.getitem}  # tuple outputs of BN ops
    for node in doomed - {root}:
        outside = [u.name for u in node.users if u not in doomed and u is not root]
        if outside:
            raise CannotFold(f"{node.name} is also read by {outside[0]}")
    constants = _constant_inputs(doomed)
    owners = tuple(f"{path.rpartition('.')[0]}." for b in merge.branches
                   for path in ((b.bn.mean if b.bn else None), (b.layer.weight if b.layer and b.layer != merge.target
                                                                 else None)) if path and "." in path)
    root.replace_all_uses_with(target)
    for node in reversed(list(gm.graph.nodes)):
        # with what only they read (a layer scale), and the tensors of the modules that go (num_batches_tracked)
        stale = not node.users and (node in constants or (node.op == "get_attr" and str(node.target).startswith(owners)))
        if node in doomed or stale:
            gm.graph.erase_node(node)
    gm.delete_all_unused_submodules()
    gm.recompile()


def _constant_inputs(nodes: set[fx.Node]) -> set[fx.Node]:
    """The attributes ``nodes`` read, and what is computed from attributes alone on the way (a ``view``)."""
    constant = constant_nodes(next(iter(nodes)).graph) if nodes else set()
    found: set[fx.Node] = set()
    stack = [a for n in nodes for a in n.all_input_nodes]
    while stack:
        node = stack.pop()
        if node in constant and node not in found and node not in nodes:
            found.add(node)
            stack.extend(node.all_input_nodes)
    return found
