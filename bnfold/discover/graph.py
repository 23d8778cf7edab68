"""Pairing BatchNorms with the layer that absorbs them, on a small dataflow graph that every front-end builds.

The front-ends (torch.fx, an observed forward pass, a ``torch.export`` graph, a TorchScript graph) only
translate their graphs into :class:`Node` objects; the rules below are stated once, and every BN that does
not fold comes back as a :class:`Skip` with a reason a user can act on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

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
    # What the structural rules (:mod:`bnfold.discover.rules`) read; front-ends that cannot tell leave them unset.
    name: str = ""  # how the host finds this node again (an fx node name, an ONNX node label)
    # Linear in its operands (add, sub, mul by a constant ``factor``, identity), or a concatenation.
    op: Literal["add", "sub", "mul", "identity", "concat"] | None = None
    operands: list[tuple[str | None, int | None]] = field(default_factory=list)  # (tensor id, producer) of data
    factor: Factor | None = None  # mul: the constant it multiplies by (per channel, or one number)
    source: str | None = None  # id of the data input tensor: two nodes with the same source read the same tensor
    axis: int | None = None  # concat: the axis, non-negative
    rank: int | None = None  # rank of the output
    channels: int | None = None  # size of the output's axis 1
    refusal: str | None = None  # a conv/linear that cannot take a fold, or a BN that cannot fold at all, and why


@dataclass(frozen=True)
class Factor:
    """A constant a branch is multiplied by: a tensor the host holds (one value per channel, or a single one),
    or a number written in the code (``path`` None)."""

    path: str | None
    value: float = 1.0


@dataclass(frozen=True)
class Part:
    """One layer's share of a BN that several layers absorb (after a Concat or an Add)."""

    layer: LayerRef
    channels: tuple[int, int] | None = None  # the BN channels [start, stop) it absorbs (Concat); None: all (Add)
    shift: bool = True  # absorbs the BN's shift too (exactly one operand of an Add does)

    def describe(self) -> str:
        if self.channels is not None:
            return f"{self.layer.name} (Concat slice {self.channels[0]}:{self.channels[1]})"
        return f"{self.layer.name} ({'scale and shift' if self.shift else 'scale'})"


@dataclass(frozen=True)
class Branch:
    """One operand of a re-parameterisable Add: ``[conv] -> [BN]``, either part optional (neither: the input itself)."""

    layer: LayerRef | None
    bn: BNRef | None
    offsets: tuple[int, ...]  # where its kernel starts inside the merged kernel, per spatial dimension
    nodes: tuple[str, ...]  # the host names of its conv and BN nodes
    sign: int = 1  # -1 when it is subtracted
    factors: tuple[Factor, ...] = ()  # constants it is multiplied by on its way to the sum (a layer scale)


@dataclass(frozen=True)
class Merge:
    """Branches summed by an Add that become one conv: ``target`` takes the Add's place, the rest goes."""

    root: str  # host name of the Add whose output the merged conv produces
    label: str  # what the user sees for that Add
    target: LayerRef
    target_node: str  # host name of the target conv's node
    branches: tuple[Branch, ...]
    removed: tuple[str, ...]  # host names of every other node that goes (inner Adds, BNs, other convs)

    def describe(self) -> str:
        return f"merged {len(self.branches)} branches into {self.target.name}"


@dataclass(frozen=True)
class Fold:
    """A BN and the layer that absorbs it: ``after`` = layer -> BN, ``before`` = BN -> layer.

    ``concat``/``add``: a BN after a Concat or an Add, absorbed by the layers in ``parts`` (``layer`` is the first).
    ``merge``: a BN on a branch of an Add that :attr:`merge` turns into one conv (``layer`` is that conv).
    """

    bn: BNRef
    layer: LayerRef
    position: Literal["after", "before", "concat", "add", "merge"]
    parts: tuple[Part, ...] = ()
    merge: Merge | None = None

    @property
    def layers(self) -> tuple[LayerRef, ...]:
        """Every layer whose tensors change."""
        if self.merge is not None:
            return (self.merge.target,)
        return tuple(p.layer for p in self.parts) or (self.layer,)

    def describe(self) -> str:
        """What happened to the BN, for tables: ``folded into conv1``, ``merged 3 branches into stage1.conv``."""
        if self.merge is not None:
            return self.merge.describe()
        if self.parts:
            return "folded into " + ", ".join(p.describe() for p in self.parts)
        return f"folded into {self.layer.name} ({self.position})"

    def to_dict(self) -> dict:
        out: dict = {"bn": self.bn.name, "layer": self.layer.name, "layer_kind": self.layer.kind,
                     "position": self.position}
        if self.parts:
            out["parts"] = [{"layer": p.layer.name, "channels": list(p.channels) if p.channels else None,
                             "shift": p.shift} for p in self.parts]
        if self.merge is not None:
            out["merge"] = {"add": self.merge.label, "into": self.merge.target.name,
                            "branches": [{"layer": b.layer.name if b.layer else None, "bn": b.bn.name if b.bn else None}
                                         for b in self.merge.branches]}
        return out


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
    # The traced GraphModule (fx front-end only, sharing the model's modules): merges are written into a copy of it.
    graph: Any = None
    # Every merge of branches, those without a BN included (they remove convs, and appear in no Fold).
    merges: list[Merge] = field(default_factory=list)

    def merge_notes(self) -> list[str]:
        """What the folds do not say: merges of branches that held no BN."""
        return [f"{m.describe()} at {m.label} (no BatchNorm on those branches)" for m in self.merges
                if not any(b.bn for b in m.branches)]


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


def pair(nodes: dict[int, Node], method: str, *, structural: bool = True) -> Discovery:
    """Decide, for every BN node, whether it folds and into what.

    ``structural``: also apply the rules of :mod:`bnfold.discover.rules` (branch merging changes the graph, so a
    host that must keep the model's structure turns it off).
    """
    from bnfold.discover import rules  # the structural rules build on this module's types

    found = Discovery(folds=[], skips=[], method=method)
    for node in nodes.values():
        if node.bn is not None and node.bn.name not in found.neighbours:
            found.bns.append(node.bn)
            found.neighbours[node.bn.name] = _neighbours(node, nodes)
    merges, merge_reasons = rules.find_merges(nodes)
    if not structural:
        for merge in merges:
            for branch in merge.branches:
                if branch.bn is not None:
                    merge_reasons[branch.bn.name] = (
                        f"on a branch of {merge.label}: merging its branches into one conv would remove it, but "
                        "that changes the architecture, which this model keeps (--keep-structure / a state dict "
                        "for the same class)")
        merges = []
    found.merges = merges
    found.folds.extend(Fold(b.bn, m.target, "merge", merge=m) for m in merges for b in m.branches if b.bn)
    work = rules.apply_merges(nodes, merges)
    done = {f.bn.name for f in found.folds}
    for node in work.values():
        if node.bn is None or node.bn.name in done:
            continue
        done.add(node.bn.name)
        result = _pair_one(node, work, structural)
        if isinstance(result, Skip) and result.bn in merge_reasons and result.reason.startswith("not next to"):
            result = Skip(result.bn, merge_reasons[result.bn])
        (found.folds if isinstance(result, Fold) else found.skips).append(result)
    return found


def _neighbours(node: Node, nodes: dict[int, Node]) -> tuple[str, list[str]]:
    """The labels of what feeds ``node`` and of what reads its output."""
    src = nodes.get(node.input) if node.input is not None else None
    users = [nodes[u].label for u in node.users if u in nodes] + ([MODEL_OUTPUT] if node.is_output else [])
    return (src.label if src is not None else MODEL_INPUT), users


def _pair_one(node: Node, nodes: dict[int, Node], structural: bool) -> Fold | Skip:
    bn = node.bn
    assert bn is not None
    if node.refusal is not None:
        return Skip(bn.name, node.refusal)
    if bn.batch_stats:
        return Skip(bn.name, "normalises with batch statistics even in eval (track_running_stats=False or no "
                             "running statistics): there are no fixed statistics to fold")
    if node.calls > 1:
        return Skip(bn.name, f"runs {node.calls} times per forward: one set of statistics cannot be folded into "
                             "several producers")
    src = nodes.get(node.input) if node.input is not None else None
    after: Fold | Skip | None = None
    if src is not None and src.layer is not None:
        after = _try_after(node, src, nodes)
    elif src is not None and src.op in ("add", "concat") and structural:
        from bnfold.discover.rules import through

        after = through(node, src, nodes)
    elif src is not None and src.refusal is not None:
        after = Skip(bn.name, f"follows {src.label}, whose {src.refusal}")
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
    if layer is None and dst.refusal is not None and dst.input == node.key:
        return Skip(bn.name, f"feeds {dst.label}, whose {dst.refusal}")
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
