"""Pairing BatchNorms with the layer that absorbs them, on a small dataflow graph that every front-end builds.

The front-ends (torch.fx, an observed forward pass, a ``torch.export`` graph, a TorchScript graph) only
translate their graphs into :class:`Node` objects; the rules below are stated once, and every BN that does
not fold comes back as a :class:`Skip` with a reason a user can act on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from bnfold.layers import BNRef, LayerRef


@dataclass
class Node:
    """One operation in the model's dataflow, as a front-end saw it."""

    key: int
    label: str  # shown in reasons: a module path or a function name
    layer: LayerRef | None = None
    bn: BNRef | None = None
    input: int | None = None  # the node producing the data input (None: a graph input or constant)
    users: list[int] = field(default_factory=list)  # nodes that read this node's output as data
    in_rank: int | None = None  # rank of the data input
    calls: int = 1  # how many times this module runs per forward (shared modules run more than once)
    is_output: bool = False  # returned by the model


@dataclass(frozen=True)
class Fold:
    """A BN and the layer that absorbs it: ``after`` = layer -> BN, ``before`` = BN -> layer."""

    bn: BNRef
    layer: LayerRef
    position: Literal["after", "before"]


@dataclass(frozen=True)
class Skip:
    """A BN that is not folded, and why."""

    bn: str
    reason: str


#: How :attr:`Discovery.neighbours` names a graph input (or constant) and the model output.
MODEL_INPUT, MODEL_OUTPUT = "(input)", "(output)"


@dataclass
class Discovery:
    folds: list[Fold]
    skips: list[Skip]
    method: str  # "fx", "observed", "export", "torchscript"
    notes: list[str] = field(default_factory=list)
    # What the rules saw, for ``bnfold inspect``: every BN paired, in graph (forward) order, and its producer's
    # label and its consumers' labels. Empty where a front-end builds its Discovery without pair().
    bns: list[BNRef] = field(default_factory=list)
    neighbours: dict[str, tuple[str, list[str]]] = field(default_factory=dict)


def unrecognised(discovery: Discovery, stat_paths: list[str]) -> Discovery:
    """Add a skip for every BN-like owner of ``running_mean`` that no BN call in the graph reads.

    In a compiled graph a FrozenBatchNorm-style module is plain arithmetic, not a batch-norm call.
    """
    known = {f.bn.mean for f in discovery.folds} | {f.bn.name for f in discovery.folds} | {s.bn for s in discovery.skips}
    for path in stat_paths:
        owner = path.rpartition(".")[0]
        if path not in known and owner not in known:
            discovery.skips.append(Skip(owner, "computes its normalisation with plain arithmetic in this graph, not a "
                                               "batch-norm op: load the eager model (state dict + --arch) to fold it"))
    return discovery


def pair(nodes: dict[int, Node], method: str) -> Discovery:
    """Decide, for every BN node, whether it folds and into what."""
    found = Discovery(folds=[], skips=[], method=method)
    for node in nodes.values():
        if node.bn is None or node.bn.name in found.neighbours:
            continue
        found.bns.append(node.bn)
        found.neighbours[node.bn.name] = _neighbours(node, nodes)
        result = _pair_one(node, nodes)
        (found.folds if isinstance(result, Fold) else found.skips).append(result)
    return found


def _neighbours(node: Node, nodes: dict[int, Node]) -> tuple[str, list[str]]:
    """The labels of what feeds ``node`` and of what reads its output."""
    src = nodes.get(node.input) if node.input is not None else None
    users = [nodes[u].label for u in node.users if u in nodes] + ([MODEL_OUTPUT] if node.is_output else [])
    return (src.label if src is not None else MODEL_INPUT), users


def _pair_one(node: Node, nodes: dict[int, Node]) -> Fold | Skip:
    bn = node.bn
    assert bn is not None
    if bn.batch_stats:
        return Skip(bn.name, "normalises with batch statistics even in eval (track_running_stats=False or no "
                             "running statistics): there are no fixed statistics to fold")
    if node.calls > 1:
        return Skip(bn.name, f"runs {node.calls} times per forward: one set of statistics cannot be folded into "
                             "several producers")
    src = nodes.get(node.input) if node.input is not None else None
    after = _try_after(node, src, nodes) if src is not None and src.layer is not None else None
    if isinstance(after, Fold):
        return after
    before = _try_before(node, nodes)
    if isinstance(before, Fold):
        return before
    # Prefer the reason about the adjacent producer: it is the fold the user most likely expected.
    if after is not None:
        return after
    if before is not None:
        return before
    src_label = src.label if src is not None else "a model input"
    users = ", ".join(nodes[u].label for u in node.users) or "nothing"
    return Skip(bn.name, f"not next to a conv/linear: input from {src_label}, output to {users} (folding needs "
                         "conv/linear -> BN, or BN -> linear / unpadded conv)")


def _try_after(node: Node, src: Node, nodes: dict[int, Node]) -> Fold | Skip:
    layer = src.layer
    assert layer is not None and node.bn is not None
    if src.calls > 1:
        return Skip(node.bn.name, f"producer {layer.name} runs {src.calls} times per forward (shared weights): "
                                  "folding would change every call")
    others = [nodes[u].label for u in src.users if u != node.key]
    if others or src.is_output:
        where = ", ".join(others + (["the model output"] if src.is_output else []))
        return Skip(node.bn.name, f"output of {layer.name} also feeds {where}: folding would change what "
                                  "those see")
    if layer.kind == "linear" and node.in_rank not in (None, 2):
        return Skip(node.bn.name, f"{layer.name} output has rank {node.in_rank}: the BN normalises axis 1, not "
                                  "the Linear's feature axis")
    return Fold(node.bn, layer, "after")


def _try_before(node: Node, nodes: dict[int, Node]) -> Fold | Skip | None:
    bn = node.bn
    assert bn is not None
    if len(node.users) != 1 or node.is_output:
        return None
    dst = nodes[node.users[0]]
    layer = dst.layer
    if layer is None or layer.kind == "conv_transpose" or dst.input != node.key:
        return None
    if not bn.plain:
        return Skip(bn.name, f"applies an activation after normalising, before {layer.name}: cannot fold forward")
    if dst.calls > 1:
        return Skip(bn.name, f"consumer {layer.name} runs {dst.calls} times per forward (shared weights)")
    if layer.padded:
        return Skip(bn.name, f"feeds padded conv {layer.name}: its padded zeros are not normalised, so folding "
                             "would not be exact")
    if layer.kind == "linear" and dst.in_rank not in (None, 2):
        return Skip(bn.name, f"feeds {layer.name} with a rank-{dst.in_rank} input: the BN channels are not the "
                             "Linear's input features")
    return Fold(bn, layer, "before")
