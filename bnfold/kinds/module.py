"""The ``module`` kind: an ``nn.Module`` (a pickled module, or a state dict loaded into ``--arch``).

Folds are written into the module tree: a folded BN module is replaced by ``Identity`` (or the activation a BN
subclass applies), a missing bias becomes a parameter. Given the traced ``GraphModule`` of the model (merges,
biases for functional calls), the host rewrites its graph. :class:`KeepStructureHost` keeps every module and
state-dict key instead (``--keep-structure``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import fx, nn

from bnfold.discover import discover
from bnfold.discover.graph import Discovery, Fold, Merge
from bnfold.fold.apply import CannotFold, neutralise
from bnfold.kinds.base import TorchAdapter
from bnfold.kinds.fx_graph import graph_add_bias, merge_in_graph, write
from bnfold.layers import BNRef, LayerRef, bn_replacement, get_tensor


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


    def finish(self) -> None:
        pass


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


class ModuleAdapter(TorchAdapter):
    kind = "module"
    eager = True

    def __init__(self, model: nn.Module, *, method: str = "auto", keep_structure: bool = False) -> None:
        super().__init__(model)
        self.method = method
        self.keep_structure = keep_structure
        self.host = KeepStructureHost if keep_structure else ModuleHost  # type: ignore[misc]

    def discover(self, reference: Any, draws: list[tuple[torch.Tensor, ...]]) -> Discovery:
        # Merging branches changes the architecture: not for a model whose state dict must load into its class.
        return discover(reference, draws, method=self.method, structural=not self.keep_structure)
