"""The ``export`` kind: a ``torch.export`` program. Its graph module runs (always reporting training=True: the
mode is baked into the graph); folds erase the BN nodes of that graph, and the result is exported again."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from bnfold.discover import fx
from bnfold.discover.fx import bn_output
from bnfold.discover.graph import Discovery, Fold, pair, unrecognised
from bnfold.inputs import InputSpec
from bnfold.kinds.base import TorchAdapter, stat_paths
from bnfold.kinds.fx_graph import constant_inputs, reader
from bnfold.kinds.module import ModuleHost
from bnfold.layers import BNRef


class GraphHost(ModuleHost):
    """A ``GraphModule`` from ``torch.export``: BN nodes are erased and missing biases become attributes."""

    def check(self, fold: Fold) -> None:
        pass

    def _node(self, attr_arg: int, path: str):
        return reader(self.root, attr_arg, path)

    def remove_bn(self, ref: BNRef) -> None:
        gm = self.root
        node = self._node(1, ref.mean)
        out = bn_output(node)
        out.replace_all_uses_with(node.args[0])
        if out is not node:
            gm.graph.erase_node(out)
        for user in list(node.users):  # the unused statistics outputs of tuple-returning ops
            gm.graph.erase_node(user)
        constants = constant_inputs({node})
        owner = (ref.mean or "").rpartition(".")[0]
        gm.graph.erase_node(node)
        for stale in reversed(list(gm.graph.nodes)):  # the BN's tensors (num_batches_tracked too): not carried on
            if not stale.users and (stale in constants or (owner and stale.op == "get_attr" and
                                                           str(stale.target).startswith(owner + "."))):
                gm.graph.erase_node(stale)
        gm.delete_all_unused_submodules()
        gm.recompile()


def program_input_specs(program: torch.export.ExportedProgram) -> list[InputSpec]:
    """The example input shapes an exported program was traced with (symbolic dims read as their hints)."""
    user_inputs = set(program.graph_signature.user_inputs)
    specs = []
    for node in program.graph.nodes:
        if node.op == "placeholder" and node.name in user_inputs:
            val = node.meta.get("val")
            if isinstance(val, torch.Tensor):
                specs.append(InputSpec(tuple(_dim(d) for d in val.shape), val.dtype))
    return specs


def has_static_batch(program: torch.export.ExportedProgram) -> bool:
    """Whether the program's first input has a fixed batch size (it then runs at that size only)."""
    user_inputs = set(program.graph_signature.user_inputs)
    for node in program.graph.nodes:
        if node.op == "placeholder" and node.name in user_inputs:
            val = node.meta.get("val")
            return isinstance(val, torch.Tensor) and val.dim() > 0 and isinstance(val.shape[0], int)
    return True


def _dim(d: Any) -> int:
    try:
        return int(d)
    except (TypeError, ValueError, RuntimeError):  # a symbolic dim: use its hint
        hint = getattr(getattr(d, "node", None), "hint", None)
        return int(hint) if hint is not None else 2


class ExportAdapter(TorchAdapter):
    """A ``torch.export`` program: its graph module runs; it declares its inputs and whether its batch is fixed."""

    kind = "export"
    has_modes = False
    host = GraphHost

    def __init__(self, model: torch.export.ExportedProgram) -> None:
        super().__init__(model)
        self._module = model.module()  # built once: it copies the program's graph

    @property
    def runnable(self) -> Callable[..., Any]:
        return self._module

    @property
    def fixed_batch(self) -> bool:
        return has_static_batch(self.model)

    def input_specs(self) -> list[InputSpec] | None:
        return program_input_specs(self.model)

    def discover(self, reference: Any, draws: list[tuple[torch.Tensor, ...]]) -> Discovery:
        return unrecognised(pair(fx.graph_nodes(reference, reference), "export"), stat_paths(reference))

    def finish(self, folded: Any, inputs: tuple[torch.Tensor, ...]) -> Any:
        return torch.export.export(folded, inputs)
