"""The pairing graph: the dataflow that every front-end builds (:class:`Node`), and what pairing decides on it
(:class:`Fold`, :class:`Merge`, :class:`Skip`, gathered in a :class:`Discovery`).

Types only: the rules are :mod:`bnfold.discover.rules`, the orchestration :func:`bnfold.discover.graph.pair`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from bnfold.discover.reasons import CODES, Reason
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
    # Linear in its operands (add, sub, mul by a constant ``factor``, identity), or a concatenation; or a layout
    # change a BN can fold through (``transpose`` by ``perm``, followed by its inverse; ``reshape`` keeping axes 0
    # and 1, so each (sample, channel) block is only re-laid out).
    op: Literal["add", "sub", "mul", "identity", "concat", "transpose", "reshape"] | None = None
    operands: list[tuple[str | None, int | None]] = field(default_factory=list)  # (tensor id, producer) of data
    factor: Factor | None = None  # mul: the constant it multiplies by (per channel, or one number)
    source: str | None = None  # id of the data input tensor: two nodes with the same source read the same tensor
    axis: int | None = None  # concat: the axis, non-negative
    perm: tuple[int, ...] | None = None  # transpose: the permutation
    rank: int | None = None  # rank of the output
    channels: int | None = None  # size of the output's axis 1
    refusal: Reason | None = None  # a conv/linear that cannot take a fold, or a BN that cannot fold at all, and why


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
class AffineFold:
    """Elementwise ops by per-channel constants after a layer, folded into it: a BatchNorm an exporter already
    wrote out as ``x * s + t`` (FrozenBatchNorm2d, tf2onnx, onnxruntime's own output), ``(x - mean) / std * gamma +
    beta`` written by hand, a layer scale, a bias ``Add``. Counted apart from BatchNorm folds."""

    layer: str  # the layer that absorbs them
    nodes: tuple[str, ...]  # the nodes taken out, in order
    ops: tuple[str, ...]  # their operators

    @property
    def name(self) -> str:
        return " -> ".join(self.nodes)

    def describe(self) -> str:
        return f"{' -> '.join(self.ops)} folded into {self.layer}"

    def to_dict(self) -> dict:
        return {"layer": self.layer, "nodes": list(self.nodes), "ops": list(self.ops)}


@dataclass(frozen=True)
class Skip:
    """A BN that is not folded: why, in words (``reason``), and the stable code of that cause (``code``, one of
    :data:`bnfold.discover.reasons.CODES`; ``"unclassified"`` for a skip made outside the rules)."""

    bn: str
    reason: str
    code: str = "unclassified"

    def __post_init__(self) -> None:
        assert self.code in CODES, f"unregistered reason code {self.code!r}"

    @classmethod
    def because(cls, bn: str, why: Reason) -> Skip:
        """The skip of ``bn`` for the reason a rule gave."""
        return cls(bn, why.text, why.code)

    def to_dict(self) -> dict[str, str]:
        return {"bn": self.bn, "reason": self.reason, "code": self.code}


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
    # ONNX: each layer's affine tail (layer label -> bnfold.onnx.graph.Tail), which the ONNX host folds.
    tails: dict[str, Any] = field(default_factory=dict)

    def merge_notes(self) -> list[str]:
        """What the folds do not say: merges of branches that held no BN."""
        return [f"{m.describe()} at {m.label} (no BatchNorm on those branches)" for m in self.merges
                if not any(b.bn for b in m.branches)]
