"""Discovery by observing one forward pass: for models that torch.fx cannot trace.

Hooks on the BN and Conv/Linear modules and a ``TorchFunctionMode`` that sees every other torch call record
which tensor each operation produced and who read it. The result is the dataflow of *this* forward pass:
control flow that depends on the input may take other paths on other inputs, so every fold found this way
is checked numerically afterwards (see :mod:`bnfold.fuse`) and reverted if it changes the outputs.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from bnfold.discover.graph import Discovery, Fold, Node, Skip, pair
from bnfold.discover.reasons import Reason
from bnfold.layers import BNRef, LayerRef, bn_ref, conv_geometry, is_bn_module, producer_ref

_FUNCTIONAL_BN = {F.batch_norm, torch.batch_norm}
# Functional layers, with the kind and the position of (stride, padding, dilation, groups) among their arguments.
_FUNCTIONAL_LAYERS: dict[Any, tuple[str, tuple[int, int, int, int] | None]] = {
    F.linear: ("linear", None),
    **{f: ("conv", (3, 4, 5, 6)) for f in (F.conv1d, F.conv2d, F.conv3d)},
    **{f: ("conv_transpose", (3, 4, 7, 6)) for f in (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)},
}


def _tensors(obj: Any) -> list[torch.Tensor]:
    return [t for t in tree_flatten(obj)[0] if isinstance(t, torch.Tensor)]


class _Observer(TorchFunctionMode):
    """Builds pairing nodes while the model runs."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.nodes: dict[int, Node] = {}
        self.producer_of: dict[int, int] = {}  # id(tensor) -> node key
        self.keep_alive: list[torch.Tensor] = []  # ids stay unique while we hold the tensors
        self.active: tuple[nn.Module, int] | None = None  # the leaf module call in progress
        self.paths = {id(t): name for name, t in [*model.named_parameters(), *model.named_buffers()]}
        self.weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.leaves: dict[int, tuple[str, Any]] = {}
        self.modules = dict(model.named_modules())
        for name, module in model.named_modules():
            if is_bn_module(module):
                self.leaves[id(module)] = (name, bn_ref(name, module))
            elif (layer := producer_ref(name, module)) is not None:
                self.leaves[id(module)] = (name, layer)

    # -- node bookkeeping ------------------------------------------------------------------------------
    def _add(self, label: str, inputs: list[torch.Tensor], outputs: list[torch.Tensor]) -> Node:
        node = Node(key=len(self.nodes), label=label)
        for i, t in enumerate(inputs):
            src = self.producer_of.get(id(t))
            if i == 0:
                node.input = src
                node.in_rank = t.dim()
            if src is not None and node.key not in self.nodes[src].users:
                self.nodes[src].users.append(node.key)
        for t in outputs:
            self.producer_of[id(t)] = node.key
        self.keep_alive.extend(inputs + outputs)
        self.nodes[node.key] = node
        return node

    def pre_hook(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        if self.active is None and id(module) in self.leaves:
            self.active = (module, len(self.keep_alive))
            self._pending_inputs = _tensors(args)[:1]

    def post_hook(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if self.active is None or self.active[0] is not module:
            return
        self.active = None
        name, ref = self.leaves[id(module)]
        node = self._add(name, self._pending_inputs, _tensors(output))
        if isinstance(ref, BNRef):
            node.bn = ref
        else:
            node.layer = ref

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001 - torch's protocol
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.active is None:
            outputs = _tensors(out)
            if outputs:
                node = self._add(getattr(func, "__name__", str(func)), _tensors((args, kwargs)), outputs)
                data = args[0] if args else kwargs.get("input")
                if func in _FUNCTIONAL_BN and not (isinstance(data, torch.Tensor) and
                                                   data.untyped_storage().data_ptr() in self.weights):
                    node.bn = self._functional_bn(args, kwargs)  # (over a weight it is weight standardisation)
                elif func in _FUNCTIONAL_LAYERS:
                    node.layer, node.refusal = self._functional_layer(func, args, kwargs)
                    if node.layer is not None:
                        node.label = node.layer.name
        return out

    def _functional_layer(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
                          ) -> tuple[LayerRef | None, Reason | None]:
        """A functional conv/linear whose weight (and bias) are the model's own tensors, as they are stored."""
        kind, positions = _FUNCTIONAL_LAYERS[func]
        names = ["input", "weight", "bias", "stride", "padding", "dilation", "groups"]
        if positions is not None:
            names = ["input", "weight", "bias"] + [""] * 5
            for name, pos in zip(("stride", "padding", "dilation", "groups"), positions):
                names[pos] = name
        bound = dict(zip(names, args))
        bound.update(kwargs)
        weight, bias = bound.get("weight"), bound.get("bias")
        paths = {}
        for role, value in (("weight", weight), ("bias", bias)):
            if isinstance(value, torch.Tensor):
                paths[role] = self.paths.get(id(value))
                if paths[role] is None:
                    return None, Reason("not-constant", f"{role} is computed in forward, not a stored tensor: a "
                                        "fold written into the stored tensor would pass through that computation "
                                        "(weight standardisation, weight norm) and not be exact")
        if not isinstance(weight, torch.Tensor):
            return None, None
        shape = tuple(weight.shape)
        # The module that owns the weight, when it is a Conv/Linear subclass with a bias slot (timm's Conv2dSame
        # passes self.bias): a bias can be given to it. Every observed fold is checked numerically afterwards.
        owner_path = paths["weight"].rpartition(".")[0]
        owner = self.modules.get(owner_path)
        module = owner_path if isinstance(owner, (nn.Linear, nn.modules.conv._ConvNd)) and (
            "bias" in owner._parameters and (bias is None or owner._parameters["bias"] is bias)) else None
        geometry = None
        if kind == "conv":
            geometry = conv_geometry(shape[2:], bound.get("stride", 1), bound.get("padding", 0),
                                     bound.get("dilation", 1))
        return LayerRef(name=paths["weight"].rpartition(".")[0] or paths["weight"], kind=kind, weight=paths["weight"],
                        bias=paths.get("bias"), groups=int(bound.get("groups", 1)),
                        padded=geometry is not None and any(p != (0, 0) for p in geometry.pads), shape=shape,
                        geometry=geometry, module=module), None

    def _functional_bn(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> BNRef:
        names = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")
        bound = dict(zip(names, args))
        bound.update(kwargs)
        paths = {k: self.paths.get(id(bound.get(k))) for k in ("running_mean", "running_var", "weight", "bias")}
        fixed = paths["running_mean"] is not None and paths["running_var"] is not None
        return BNRef(
            name=(paths["running_mean"] or "batch_norm").rpartition(".")[0] or "batch_norm",
            mean=paths["running_mean"],
            var=paths["running_var"],
            weight=paths["weight"],
            bias=paths["bias"],
            eps=float(bound.get("eps", 1e-5)),
            batch_stats=not fixed or bool(bound.get("training", False)),
        )


def observe(model: nn.Module, example_inputs: tuple[Any, ...]) -> Discovery:
    """Pair BNs from the dataflow of one forward pass on ``example_inputs``."""
    observer = _Observer(model)
    handles = []
    for module in model.modules():
        if id(module) in observer.leaves:
            handles.append(module.register_forward_pre_hook(observer.pre_hook))
            handles.append(module.register_forward_hook(observer.post_hook))
    try:
        with torch.no_grad(), observer:
            output = model(*example_inputs)
    finally:
        for h in handles:
            h.remove()
    nodes = observer.nodes
    for t in _tensors(output):
        if (key := observer.producer_of.get(id(t))) is not None:
            nodes[key].is_output = True

    def name(n: Node) -> str | None:
        return n.bn.name if n.bn is not None else n.layer.name if n.layer is not None else None

    calls = Counter(name(n) for n in nodes.values())
    for n in nodes.values():
        if name(n) is not None:
            n.calls = calls[name(n)]
    return pair(nodes, "observed")


def discover(model: nn.Module, input_draws: list[tuple[Any, ...]]) -> Discovery:
    """Observe several forward passes and keep only what every pass that ran a BN agrees on.

    Different inputs can take different branches: a BN seen in one pass only is paired from that pass; a
    BN paired differently by two passes, or skipped by any, is not folded.
    """
    folds: dict[str, Fold] = {}
    skips: dict[str, Skip] = {}
    bns: dict[str, BNRef] = {}  # every BN, in the order the passes first ran it, and what it read and fed
    neighbours: dict[str, tuple[str, list[str]]] = {}
    for inputs in input_draws:
        found = observe(model, inputs)
        for ref in found.bns:
            bns.setdefault(ref.name, ref)
            neighbours.setdefault(ref.name, found.neighbours[ref.name])
        for skip in found.skips:
            skips.setdefault(skip.bn, skip)
        for fold in found.folds:
            earlier = folds.setdefault(fold.bn.name, fold)
            if earlier != fold:
                skips.setdefault(fold.bn.name, Skip(fold.bn.name, f"pairs with {earlier.layer.name} on one input and "
                                                                  f"{fold.layer.name} on another", "input-dependent"))
    return Discovery(
        folds=[f for name, f in folds.items() if name not in skips],
        skips=list(skips.values()),
        method="observed",
        bns=list(bns.values()),
        neighbours=neighbours,
    )
