"""An ONNX graph as the pairing graph of :mod:`bnfold.discover.graph`, and as a tensor host for ``apply_fold``.

:func:`translate` makes one :class:`~bnfold.discover.graph.Node` per ONNX node of the main graph, with a
``LayerRef`` on Conv, ConvTranspose, Gemm and MatMul and a ``BNRef`` on BatchNormalization; :func:`plan` pairs them
with the shared rules. A layer may be followed by an *affine tail* (:func:`_tail`): ``Mul``, ``Div``, ``Add`` and
``Sub`` nodes by constants that vary along its output channel axis alone (axis 1 of a Conv/ConvTranspose output,
the last of a Gemm/MatMul one; scalars too; ``Div`` and ``Sub`` with the constant second), each reading the
previous node's output alone, possibly through ``Transpose`` nodes (tf2onnx's NHWC graphs; the channel axis moves
with them): a BN an exporter already wrote out (FrozenBatchNorm2d, Keras), a layer scale, a bias ``Add`` as
paddle2onnx writes every one. The host folds the tail into the layer (:meth:`OnnxHost.fold_tails`, and
:meth:`OnnxHost.claim_layer` before a BN folds into it); its leading nodes *carry* the layer in the pairing graph,
so a BN after them folds as if it followed the layer. What the shared rules cannot see is ONNX-specific and decided
here, each as a node's refusal: a parameter that is not a constant (a graph input, an initializer also listed as a
graph input, the output of a node), ``spatial=0`` (opsets 7 and 8), ``training_mode=1``, a Gemm with ``transA=1``
(its input rows are not features), a MatMul without a constant 2-D weight or of unknown rank, and an op of a
constant after a layer that cannot join its tail (``c - layer``, a constant that broadcasts over other axes, a
layer output read elsewhere too, a "constant" fed at run time).

A graph is indexed in one place, :class:`GraphIndex` (producer and readers of every name, constants, inputs,
outputs), and its nodes are labelled in one place, :func:`node_labels`; every module that walks an ONNX graph
uses the two (lint, constant weights, the BN010 culprit search, export's list of BNs left in).

Tensors are named by their ONNX names (initializers and ``Constant`` outputs). :class:`OnnxHost` presents
each tensor in the layout torch uses for the same layer, in float64, and writes results back in the stored
dtype and layout, so that :mod:`bnfold.fold.math` and :func:`bnfold.fold.apply.apply_fold` serve ONNX as
they serve modules.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import ml_dtypes
import numpy as np
import onnx
import torch
from onnx import TensorProto, numpy_helper

from bnfold.discover.graph import AffineFold, Discovery, Factor, Fold, Merge, Node, Skip, pair
from bnfold.discover.reasons import Reason
from bnfold.discover.rules import inverse, out_channels, per_channel
from bnfold.errors import LoadError
from bnfold.fold.apply import CannotFold
from bnfold.fold.math import BNParams, fold_bn_after
from bnfold.layers import BNRef, Geometry, LayerRef
from bnfold.onnx.dims import fixed_size

#: Oldest default-domain opset folded. BatchNormalization-7/8 compute what BatchNormalization-9 does when
#: ``spatial=1`` (their default), and ``spatial=0`` is refused per node; opset 6 and older have ``is_test``
#: and Gemm's ``broadcast`` flag, semantics bnfold does not model.
MIN_OPSET = 7
#: The newest default-domain opset the installed onnx knows.
MAX_OPSET = onnx.defs.onnx_opset_version()

#: Stored ONNX element types that fold, and the torch dtype each is cast to on write.
FLOAT_TYPES: dict[int, torch.dtype] = {
    TensorProto.FLOAT: torch.float32,
    TensorProto.FLOAT16: torch.float16,
    TensorProto.BFLOAT16: torch.bfloat16,
    TensorProto.DOUBLE: torch.float64,
}
_LAYER_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
_BN_ROLES = ("scale", "B", "mean", "var")  # BatchNormalization inputs 1..4
_PADDING_AUTO = ("SAME_UPPER", "SAME_LOWER")  # auto_pad values that pad (NOTSET with zero pads and VALID do not)
#: Tensors up to this many elements are kept whole for shape inference (shape inputs of Reshape and the like);
#: larger float tensors are weights and only their type and dims are needed.
_SHAPE_ONLY_ABOVE = 1024


def graph_inputs(graph: onnx.GraphProto) -> list[onnx.ValueInfoProto]:
    """The inputs a caller feeds (initializers listed as inputs, IR < 4, have defaults and are left out)."""
    initializers = {t.name for t in graph.initializer}
    return [i for i in graph.input if i.name not in initializers]


def node_labels(nodes: Sequence[onnx.NodeProto]) -> list[str]:
    """What a user sees for each node, the one labelling bnfold uses: its name, or ``OpType#index`` when it has
    none. Unique: names need not be (nor differ from another node's ``OpType#index``), and folds are applied by
    label, so a label shared by two nodes is suffixed with ``@index`` on both."""
    labels = [node.name or f"{node.op_type}#{index}" for index, node in enumerate(nodes)]
    counts = Counter(labels)
    return [f"{label}@{index}" if counts[label] > 1 else label for index, label in enumerate(labels)]


def attributes(node: onnx.NodeProto) -> dict[str, object]:
    """A node's attributes as Python values, by name."""
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _type_name(data_type: int) -> str:
    return TensorProto.DataType.Name(data_type) if data_type in TensorProto.DataType.values() else str(data_type)


# -- what onnx versions and domains bnfold takes ---------------------------------------------------------------
def _labelled(graph: onnx.GraphProto, prefix: str = "") -> Iterator[tuple[str, onnx.NodeProto]]:
    """Every node of ``graph`` and of its subgraphs with its label; a subgraph's nodes are labelled under the
    node that holds them (``If#3/Conv#0``)."""
    for label, node in zip(node_labels(graph.node), graph.node):
        label = f"{prefix}/{label}" if prefix else label
        yield label, node
        for sub in _subgraphs(node):
            yield from _labelled(sub, label)


def _subgraphs(node: onnx.NodeProto) -> Iterator[onnx.GraphProto]:
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            yield attr.g
        elif attr.type == onnx.AttributeProto.GRAPHS:
            yield from attr.graphs


def check_supported(model: onnx.ModelProto) -> None:
    """Raise :class:`LoadError` unless bnfold can fold ``model``: a graph, a default-domain opset from
    :data:`MIN_OPSET` to :data:`MAX_OPSET`, and operators onnx knows (or functions the model defines)."""
    if not model.HasField("graph"):
        raise LoadError("the file holds no ONNX graph (ModelProto.graph is empty)",
                        "pass the .onnx model file itself, not a data or weights file")
    if model.ir_version > onnx.IR_VERSION:
        raise LoadError(f"the model has IR version {model.ir_version}; the installed onnx {onnx.__version__} reads "
                        f"up to {onnx.IR_VERSION}", "upgrade onnx: pip install -U onnx")
    versions = {imp.domain or "ai.onnx": imp.version for imp in model.opset_import}
    default = versions.get("ai.onnx")
    if default is None:
        raise LoadError("the model imports no version of the standard ONNX operators (opset_import has no '' "
                        "domain)", "re-export the model, or add the opset it was built for to opset_import")
    if default < MIN_OPSET:
        raise LoadError(f"opset {default} is older than bnfold folds (opsets {MIN_OPSET} to {MAX_OPSET})",
                        "convert it first: onnx.version_converter.convert_version(model, 17)")
    if default > MAX_OPSET:
        raise LoadError(f"opset {default} is newer than the installed onnx {onnx.__version__} knows (up to "
                        f"{MAX_OPSET})", "upgrade onnx (pip install -U onnx), or export with an older opset")
    local = {f.domain for f in model.functions}
    for label, node in _labelled(model.graph):
        domain = node.domain or "ai.onnx"
        if node.domain in local or onnx.defs.has(node.op_type, "" if domain == "ai.onnx" else domain):
            continue
        what = (f"operator {node.op_type} is not a standard ONNX operator" if domain == "ai.onnx" else
                f"operator {node.op_type} comes from domain '{domain}', which onnx does not know")
        raise LoadError(f"node {label}: {what}",
                        "bnfold folds standard ONNX graphs: fold before converting to a runtime-specific graph "
                        "(onnxruntime's com.microsoft operators, TensorRT plugins)")


# -- what the graph holds ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Const:
    """A constant's type and shape, known without decoding its data."""

    data_type: int
    shape: tuple[int, ...]

    @classmethod
    def of(cls, tensor: TensorProto) -> _Const:
        return cls(tensor.data_type, tuple(tensor.dims))


def _constant_of(node: onnx.NodeProto) -> _Const | None:
    """The type and shape of a ``Constant`` node's value, None for forms that are not a dense tensor."""
    if node.op_type != "Constant" or node.domain not in ("", "ai.onnx") or len(node.attribute) != 1:
        return None
    attr = node.attribute[0]
    if attr.name == "value":
        return _Const(attr.t.data_type, tuple(attr.t.dims))
    if attr.name == "value_float":
        return _Const(TensorProto.FLOAT, ())
    if attr.name == "value_floats":
        return _Const(TensorProto.FLOAT, (len(attr.floats),))
    return None


def _subgraph_reads(graph: onnx.GraphProto) -> set[str]:
    """Names a subgraph reads from the scopes around it (every name its nodes read and it does not define)."""
    defined = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    read: set[str] = set()
    for node in graph.node:
        read.update(n for n in node.input if n)
        for inner in _subgraphs(node):
            read |= _subgraph_reads(inner)
        defined.update(node.output)
    read.update(o.name for o in graph.output)
    return read - defined


@dataclass
class GraphIndex:
    """The one index of an ONNX main graph: who writes and who reads every name, its constants, its inputs and
    outputs, and each node's label (:func:`node_labels`). Nodes are named by their position in :attr:`nodes`.

    Built once (:meth:`of`) by everything that walks a graph (translation, the tensor host, lint, constant
    weights, the BN010 culprit search, export's safety net). An editor keeps it true: :meth:`editing` around a
    change to a node's inputs or outputs, :meth:`forget` for a node taken out, :meth:`add` for a new node.
    Subgraphs are never edited, so what they read (:attr:`nested`) stays as it was; :attr:`constants` holds the
    types and shapes the graph had when it was indexed, and the initializers a host adds.
    """

    nodes: list[onnx.NodeProto]  # the main graph's nodes (the graph's own messages: edits show in the graph)
    labels: list[str]
    constants: dict[str, _Const]  # initializers and Constant node outputs
    initializers: dict[str, TensorProto]
    inputs: frozenset[str]  # graph inputs (initializers listed as inputs included)
    fed: tuple[str, ...]  # the inputs a caller feeds, in order (:func:`graph_inputs`)
    outputs: dict[str, None]  # graph outputs, in order (a dict as an ordered set)
    producer: dict[str, int] = field(default_factory=dict)  # name -> position of the node writing it
    readers: dict[str, list[tuple[int, int]]] = field(default_factory=dict)  # name -> (position, input slot)
    nested: dict[str, list[int]] = field(default_factory=dict)  # name -> positions of nodes whose subgraphs read it

    @classmethod
    def of(cls, graph: onnx.GraphProto) -> GraphIndex:
        index = cls(list(graph.node), node_labels(graph.node), {t.name: _Const.of(t) for t in graph.initializer},
                    {t.name: t for t in graph.initializer}, frozenset(i.name for i in graph.input),
                    tuple(i.name for i in graph_inputs(graph)), dict.fromkeys(o.name for o in graph.output))
        for position, node in enumerate(index.nodes):
            const = _constant_of(node)
            if const is not None:
                index.constants[node.output[0]] = const
            index._record(position)
            for name in set().union(*map(_subgraph_reads, _subgraphs(node))):
                index.nested.setdefault(name, []).append(position)
        return index

    def reading(self, name: str) -> list[tuple[onnx.NodeProto, int]]:
        """The nodes that read ``name`` (top-level reads), each with the input slot it reads it at."""
        return [(self.nodes[position], slot) for position, slot in self.readers.get(name, ())]

    def tensor(self, name: str) -> TensorProto | None:
        """The stored value of ``name``: its initializer or its ``Constant`` node's tensor (None for anything
        else, and for ``value_float(s)`` constants, which hold no tensor)."""
        if name in self.initializers:
            return self.initializers[name]
        position = self.producer.get(name)
        if position is None or _constant_of(self.nodes[position]) is None:
            return None
        value = self.nodes[position].attribute[0]
        return value.t if value.name == "value" else None

    @contextlib.contextmanager
    def editing(self, position: int) -> Iterator[onnx.NodeProto]:
        """The node at ``position``, to change its inputs or outputs in the block; indexed again after it."""
        self.forget(position)
        try:
            yield self.nodes[position]
        finally:
            self._record(position)

    def add(self, node: onnx.NodeProto) -> int:
        """Index ``node``, a new node with a name of its own (the caller places it in the graph); its position."""
        assert node.name, "a node added to a graph is given a fresh name, which is its label"
        self.nodes.append(node)
        self.labels.append(node.name)
        self._record(len(self.nodes) - 1)
        return len(self.nodes) - 1

    def forget(self, position: int) -> None:
        """Forget what the node at ``position`` reads and writes (a node taken out of the graph)."""
        node = self.nodes[position]
        for name in node.input:
            if name:
                self.readers[name] = [(p, s) for p, s in self.readers[name] if p != position]
        for name in node.output:
            if self.producer.get(name) == position:
                del self.producer[name]

    def _record(self, position: int) -> None:
        node = self.nodes[position]
        for slot, name in enumerate(node.input):
            if name:
                self.readers.setdefault(name, []).append((position, slot))
        for name in node.output:
            if name:
                self.producer[name] = position

    def not_constant(self, name: str, role: str) -> Reason | None:
        """Why ``name`` is not a constant a fold can rewrite (``role`` names it for the user); None when it is."""
        if name in self.inputs:
            if name in self.initializers:
                return Reason("not-constant", f"{role} '{name}' is an initializer also listed as a graph input (a "
                              "caller can override it at run time): not a constant; remove it from graph.input to fold")
            return Reason("not-constant", f"{role} '{name}' is a graph input (fed at run time): not a constant")
        if name in self.constants:
            return None
        if name in self.producer:
            index = self.producer[name]
            return Reason("not-constant", f"{role} '{name}' is computed by node {self.labels[index]}: not a constant")
        return Reason("not-constant", f"{role} '{name}' is not defined in the graph")

    def users(self, name: str) -> int:
        """How many reads of ``name`` there are: node inputs, subgraphs, graph outputs."""
        return len(self.readers.get(name, ())) + len(self.nested.get(name, ())) + (name in self.outputs)


def _float_param(index: GraphIndex, name: str, role: str) -> Reason | None:
    """Why ``name`` cannot be a rewritten float parameter; None when it can."""
    reason = index.not_constant(name, role)
    if reason is None and index.constants[name].data_type not in FLOAT_TYPES:
        reason = Reason("not-float", f"{role} '{name}' has element type "
                        f"{_type_name(index.constants[name].data_type)}: only float, float16, bfloat16 and double "
                        "parameters fold")
    return reason


# -- ONNX graph -> pairing nodes -----------------------------------------------------------------------------
def _bn_ref(node: onnx.NodeProto, label: str, index: GraphIndex) -> tuple[BNRef, Reason | None]:
    """The BN's reference, and why it cannot fold whatever its neighbours (None: the shared rules decide)."""
    attrs = attributes(node)
    params = list(node.input[1:5])
    training = attrs.get("training_mode", 0) == 1 or sum(1 for o in node.output[1:] if o) > 0
    ref = BNRef(name=label, mean=params[2], var=params[3], weight=params[0], bias=params[1],
                eps=float(attrs.get("epsilon", 1e-5)), batch_stats=training)
    if training:
        return ref, Reason("training-mode", "training_mode=1 (or running-statistics outputs): it normalises with "
                           "batch statistics at inference (BN009), so there are no fixed statistics to fold; "
                           "re-export the model in eval mode")
    if attrs.get("spatial", 1) == 0:
        return ref, Reason("spatial", "spatial=0: statistics per (channel, position), not per channel, do not fold "
                           "into a layer's weights; re-export with opset 9 or newer")
    reasons = [_float_param(index, name, role) for name, role in zip(params, _BN_ROLES)]
    return ref, next((r for r in reasons if r), None)


def _padded(node: onnx.NodeProto) -> bool:
    attrs = attributes(node)
    auto_pad = attrs.get("auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else str(auto_pad)
    return auto_pad in _PADDING_AUTO or any(p != 0 for p in attrs.get("pads", ()))


#: The elementwise operators of an affine tail.
_TAIL_OPS = ("Add", "Sub", "Mul", "Div")
_SCALES = ("Mul", "Div")


@dataclass(frozen=True)
class Step:
    """One node of an affine tail: an elementwise op with a constant, or a Transpose the tail reads through."""

    position: int
    label: str
    op: str  # "Mul", "Div", "Add", "Sub" or "Transpose"
    constant: str | None = None


@dataclass(frozen=True)
class Tail:
    """The nodes after a layer that compute an affine map of its output, channel by channel (see the module
    docstring), in order, each reading the previous one's output alone. ``refusal``: the node after them that
    applies a constant but cannot join the tail, and why (a BN after that node says so); None when there is none."""

    layer: LayerRef  # as translated: the layer's own tensors
    position: int
    steps: tuple[Step, ...]
    matmul: bool = False
    refusal: tuple[int, Reason] | None = None
    # The leading steps that carry the layer in the pairing graph, so that a BN after them folds into it (the host
    # folds the tail first): up to a Transpose; only shifts (a bias) unless a BatchNormalization reads the last.
    carried: tuple[Step, ...] = ()

    @property
    def ops(self) -> tuple[Step, ...]:
        """The elementwise steps (Transposes stay where they are)."""
        return tuple(s for s in self.steps if s.op != "Transpose")

    @property
    def removes(self) -> int:
        """How many nodes folding the tail takes out of the graph: every elementwise one, but for a MatMul (which
        has no bias input) the one that then adds its bias."""
        ops = self.ops
        return len(ops) - (self.matmul and any(s.op not in _SCALES for s in ops))


def _tail(index: GraphIndex, position: int, layer: LayerRef, rank: int, axis: int,
          shapes: dict[str, tuple[int | None, ...]]) -> Tail | None:
    """The affine tail after layer ``position``, whose rank-``rank`` output has its channels on ``axis``: the
    ``Mul``/``Div``/``Add``/``Sub`` nodes by a constant that varies along the channel axis alone (a scalar too;
    ``Div`` and ``Sub`` with the constant second), through ``Transpose`` nodes (the channel axis moves with them;
    not after a MatMul, whose bias stays next to it). None when there is none and no node refuses to be one."""
    matmul = index.nodes[position].op_type == "MatMul"
    label, channels = index.labels[position], out_channels(layer)
    steps: list[Step] = []
    refusal: tuple[int, Reason] | None = None
    out, through = index.nodes[position].output[0], False

    def per_channel_constant(shape: tuple[int | None, ...]) -> bool:
        return None not in shape and per_channel(shape, rank, axis) and math.prod(shape) in (1, channels)

    def applies_constant(reader: int, slot: int) -> bool:
        """An op with a would-be constant, not an op of two data tensors: a constant, or a graph input shaped
        like a per-channel one."""
        node = index.nodes[reader]
        if node.op_type not in _TAIL_OPS or node.domain not in ("", "ai.onnx") or len(node.input) != 2:
            return False
        other = node.input[1 - slot]
        return other != out and (other in index.constants or
                                 (other in index.inputs and per_channel_constant(shapes.get(other, (None,)))))

    while refusal is None:
        reads = index.readers.get(out, ())
        found = next((read for read in reads if applies_constant(*read)), None)
        if found is None:  # through a Transpose that reads it alone, or the end
            reader = index.nodes[reads[0][0]] if len(reads) == 1 else None
            if (reader is None or matmul or index.users(out) != 1 or reader.op_type != "Transpose"
                    or reader.domain not in ("", "ai.onnx")):
                break
            perm = [int(p) for p in attributes(reader).get("perm") or reversed(range(rank))]
            if sorted(perm) != list(range(rank)):
                break
            axis, through = perm.index(axis), True
            steps.append(Step(reads[0][0], index.labels[reads[0][0]], "Transpose"))
            out = reader.output[0]
            continue
        reader, slot = found
        node = index.nodes[reader]
        constant = node.input[1 - slot]
        why = _not_in_tail(index, node, slot, out, constant, label, per_channel_constant, rank, axis, channels,
                           index.constants[layer.weight].data_type)
        if why is not None:
            refusal = None if through else (reader, why)  # after a Transpose no BN folds into the layer anyway
            break
        steps.append(Step(reader, index.labels[reader], node.op_type, constant))
        out = node.output[0]
    while steps and steps[-1].op == "Transpose":  # a Transpose after the last op is not part of the tail
        steps.pop()
    if not steps and refusal is None:
        return None
    carried = steps[:next((i for i, s in enumerate(steps) if s.op == "Transpose"), len(steps))]
    last = index.nodes[carried[-1].position].output[0] if carried else None
    if not any(index.nodes[p].op_type == "BatchNormalization" for p, _ in index.readers.get(last, ())):
        # A scale carried would hide a layer scale from branch merging (which reads it as a factor): only a bias.
        carried = carried[:next((i for i, s in enumerate(carried) if s.op in _SCALES), len(carried))]
    return Tail(layer, position, tuple(steps), matmul, refusal if len(carried) == len(steps) else None,
                tuple(carried))


def _not_in_tail(index: GraphIndex, node: onnx.NodeProto, slot: int, out: str, constant: str, label: str,
                 per_channel_constant, rank: int, axis: int, channels: int | None, dtype: int) -> Reason | None:
    """Why ``node``, which applies ``constant`` to ``out`` (``label``'s output, or its tail's), cannot join the tail."""
    op = node.op_type
    if op == "Sub" and slot == 1:
        return Reason("not-a-layer", f"constant '{constant}' is its first operand: '{constant}' - {label} negates "
                      f"{label}'s output, it is not a bias (only {label} - constant is one)")
    if op == "Div" and slot == 1:
        return Reason("not-a-layer", f"constant '{constant}' is its first operand: '{constant}' / {label} is not "
                      f"affine in {label}'s output (only {label} / constant is a scale)")
    if index.users(out) != 1:
        others = [index.labels[p] for p, _ in index.readers[out] if index.nodes[p] is not node]
        others += ["a subgraph"] * bool(index.nested.get(out)) + ["the model output"] * (out in index.outputs)
        role = "bias" if op in ("Add", "Sub") else "scale"
        return Reason("shared-output", f"operand {label} also feeds {', '.join(others)}: its constant "
                      f"'{constant}' cannot become {label}'s {role} without changing what those see")
    reason = _float_param(index, constant, "bias" if op in ("Add", "Sub") else "scale")
    if reason is not None:
        return reason
    if index.constants[constant].data_type != dtype:
        return Reason("dtype-mismatch", f"constant '{constant}' has element type "
                      f"{_type_name(index.constants[constant].data_type)}, {label}'s weight {_type_name(dtype)}: an "
                      "ill-typed graph, which bnfold does not fold")
    shape = index.constants[constant].shape
    if not per_channel_constant(shape):
        wanted = (1,) * axis + (channels,) + (1,) * (rank - axis - 1)
        what = "bias" if op in ("Add", "Sub") else "scale"
        return Reason("broadcast", f"constant '{constant}' of shape {shape} does not vary along {label}'s channel "
                      f"axis alone (axis {axis} of its rank-{rank} output): it is not a per-channel {what}, which has "
                      f"shape {wanted} (or fewer leading 1s)")
    return None


def _output_axis(node: onnx.NodeProto, layer: LayerRef, ranks: dict[str, int]) -> tuple[int, int]:
    """The rank of a layer's output and its channel axis: axis 1 of a Conv's (of its weight's rank), the last of a
    Gemm's (rank 2) or a MatMul's (its input's rank)."""
    if layer.kind != "linear":
        return len(layer.shape), 1
    rank = 2 if node.op_type == "Gemm" else ranks[node.input[0]]
    return rank, rank - 1


@dataclass
class Translation:
    """The pairing nodes of one graph, and what only ONNX knows about them."""

    nodes: dict[int, Node]  # a BN or Conv/Gemm/MatMul that cannot fold at all says why in its ``refusal``
    rows_as_input: set[str]  # Gemm labels with transA=1: a BN before them normalises rows, not features
    nested_bns: list[Skip]
    notes: list[str] = field(default_factory=list)
    tails: dict[str, Tail] = field(default_factory=dict)  # layer label -> its affine tail (a step at least)


def _layer_ref(node: onnx.NodeProto, position: int, index: GraphIndex,
               ranks: dict[str, int]) -> tuple[LayerRef | None, Reason | None]:
    """(the layer, why it cannot fold); its affine tail, if any, is :func:`_tail`'s."""
    op, label, attrs = node.op_type, index.labels[position], attributes(node)
    inputs = list(node.input) + [""] * 3
    if op == "MatMul" and inputs[0] in index.constants and inputs[1] not in index.constants:
        return None, Reason("not-a-layer", f"constant '{inputs[0]}' is its first operand: it is not a layer applied "
                            "to the data")
    weight, bias = inputs[1], inputs[2] if op != "MatMul" else ""
    reason = _float_param(index, weight, "weight") or (_float_param(index, bias, "bias") if bias else None)
    if reason:
        return None, reason
    shape = index.constants[weight].shape
    if op in ("Conv", "ConvTranspose"):
        kind = "conv" if op == "Conv" else "conv_transpose"
        return LayerRef(label, kind, weight, bias or None, groups=int(attrs.get("group", 1)),
                        padded=op == "Conv" and _padded(node), module=label, shape=shape,
                        geometry=_geometry(attrs, shape) if op == "Conv" else None), None
    if len(shape) != 2:
        return None, Reason("weight-shape", f"weight '{weight}' has shape {shape}: only a 2-D constant weight "
                            "folds")
    if op == "Gemm":
        torch_shape = shape if attrs.get("transB", 0) == 1 else shape[::-1]
        return LayerRef(label, "linear", weight, bias or None, module=label, shape=torch_shape), None
    if ranks.get(inputs[0]) is None:
        return None, Reason("unknown-shape", f"input '{inputs[0]}' has unknown rank, so bnfold cannot tell whether "
                            "the BN's axis 1 is its feature axis; give the graph inputs a fixed rank")
    return LayerRef(label, "linear", weight, None, module=label, shape=shape[::-1]), None


def _geometry(attrs: dict[str, object], shape: tuple[int, ...]) -> Geometry | None:
    """A Conv's stride, dilation and pads (None where ``auto_pad`` leaves the pads to the input size)."""
    auto_pad = attrs.get("auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else str(auto_pad)
    dims = len(shape) - 2
    if auto_pad in _PADDING_AUTO:
        return None
    pads = list(attrs.get("pads", [0] * 2 * dims)) if auto_pad != "VALID" else [0] * 2 * dims
    strides = tuple(attrs.get("strides", [1] * dims))
    dilations = tuple(attrs.get("dilations", [1] * dims))
    if len(pads) != 2 * dims or len(strides) != dims or len(dilations) != dims:
        return None
    if any(v < 1 for v in (*strides, *dilations)) or any(p < 0 for p in pads):  # not a valid Conv: no merge
        return None
    return Geometry(strides, dilations, tuple(zip(pads[:dims], pads[dims:])))


def _shapes(model: onnx.ModelProto) -> tuple[dict[str, tuple[int | None, ...]], list[str]]:
    """The shape (None for an unknown dimension) of every name shape inference can tell, run on a copy whose large
    weights are type and dims only (cheap, and below protobuf's 2 GB limit whatever the model's size)."""
    skeleton = onnx.ModelProto()
    _copy_fields(model, skeleton, skip="graph")
    _copy_fields(model.graph, skeleton.graph, skip="initializer")
    for tensor in model.graph.initializer:
        stub = skeleton.graph.initializer.add()
        if tensor.data_type in FLOAT_TYPES and int(np.prod(tensor.dims)) > _SHAPE_ONLY_ABOVE:
            stub.name, stub.data_type = tensor.name, tensor.data_type
            stub.dims.extend(tensor.dims)
        else:
            stub.CopyFrom(tensor)
    notes = []
    try:
        inferred = onnx.shape_inference.infer_shapes(skeleton, strict_mode=False, data_prop=True)
    except (onnx.shape_inference.InferenceError, onnx.checker.ValidationError, RuntimeError, ValueError) as exc:
        # the fold goes on without ranks
        inferred = skeleton
        notes.append(f"shape inference failed ({type(exc).__name__}); MatMul layers of unknown rank are not folded")
    shapes: dict[str, tuple[int | None, ...]] = {t.name: tuple(t.dims) for t in model.graph.initializer}
    graph = inferred.graph
    for info in [*graph.input, *graph.value_info, *graph.output]:
        tensor_type = info.type.tensor_type
        if info.type.HasField("tensor_type") and tensor_type.HasField("shape"):
            shapes[info.name] = tuple(fixed_size(d) for d in tensor_type.shape.dim)
    return shapes, notes


def _copy_fields(source, target, skip: str) -> None:
    """Copy every field that is set in protobuf message ``source`` to ``target``, except ``skip``."""
    for desc, value in source.ListFields():
        if desc.name == skip:
            continue
        repeated = desc.is_repeated if hasattr(desc, "is_repeated") else desc.label == desc.LABEL_REPEATED
        if repeated:
            getattr(target, desc.name).extend(value)
        elif desc.message_type is not None:
            getattr(target, desc.name).CopyFrom(value)
        else:
            setattr(target, desc.name, value)


def translate(model: onnx.ModelProto) -> Translation:
    """One pairing node per node of ``model``'s main graph (see the module docstring)."""
    index = GraphIndex.of(model.graph)
    shapes, notes = _shapes(model)
    ranks = {name: len(shape) for name, shape in shapes.items()}
    zeros = _zero_constants(index)
    nodes: dict[int, Node] = {}
    rows_as_input: set[str] = set()
    data_of: dict[int, str] = {}  # tail node position -> its data operand (either order)
    tails: dict[str, Tail] = {}
    for position, onnx_node in enumerate(index.nodes):
        label = index.labels[position]
        data = data_of.get(position) or (onnx_node.input[0] if onnx_node.input else "")
        node = nodes.setdefault(position, Node(key=position, label=label))
        node.name = label
        node.input = index.producer.get(data) if data else None
        node.in_rank = ranks.get(data) if data else None
        node.source = data or None
        node.is_output = any(o in index.outputs for o in onnx_node.output)
        out_shape = shapes.get(onnx_node.output[0]) if onnx_node.output else None
        if out_shape is not None:
            node.rank, node.channels = len(out_shape), out_shape[1] if len(out_shape) > 1 else None
        standard = onnx_node.domain in ("", "ai.onnx")
        if standard and node.layer is None and onnx_node.op_type in ("Add", "Sum", "Sub", "Mul", "Identity",
                                                                     "Concat", "Dropout"):
            _mark_structure(node, onnx_node, index, zeros)
        if standard and node.layer is None and onnx_node.op_type in _LAYOUT_OPS:
            _mark_layout(node, onnx_node, shapes.get(data), out_shape)
        if standard and onnx_node.op_type == "BatchNormalization":
            node.bn, node.refusal = _bn_ref(onnx_node, label, index)
        elif standard and onnx_node.op_type in _LAYER_OPS and len(onnx_node.input) >= 2:
            layer, node.refusal = _layer_ref(onnx_node, position, index, ranks)
            tail = _tail(index, position, layer, *_output_axis(onnx_node, layer, ranks), shapes) if layer else None
            if tail is not None:
                layer = _carry(tail, layer, index, nodes, data_of)
                if tail.steps:
                    tails[label] = tail
            node.layer = layer
            if onnx_node.op_type == "Gemm" and attributes(onnx_node).get("transA", 0) == 1:
                rows_as_input.add(label)
    for name, reads in index.readers.items():
        if name in index.producer:
            users = nodes[index.producer[name]].users
            users.extend(k for k, _ in reads if k not in users)
    for name, containers in index.nested.items():
        if name in index.producer:
            users = nodes[index.producer[name]].users
            users.extend(k for k in containers if k not in users)
    nested = [Skip(label, f"inside a subgraph of {index.labels[pos]}: bnfold folds BatchNormalization in the main "
                          "graph only", "subgraph")
              for pos, onnx_node in enumerate(index.nodes) for sub in _subgraphs(onnx_node)
              for label, inner in _labelled(sub, index.labels[pos]) if inner.op_type == "BatchNormalization"]
    return Translation(nodes, rows_as_input, nested, notes, tails)


def _carry(tail: Tail, layer: LayerRef, index: GraphIndex, nodes: dict[int, Node], data_of: dict[int, str]) -> LayerRef:
    """Mark the tail's carried nodes in the pairing graph: each carries the layer (a BN after them folds into it,
    and the host folds the tail first); the node that refuses to join says why. The layer as they carry it: until
    the host folds the tail (:meth:`OnnxHost.claim_layer`), its bias is named by the last carried node's output,
    not a constant as a bias of the layer's own is."""
    carried = tail.carried
    if carried:
        layer = dataclasses.replace(layer, bias=index.nodes[carried[-1].position].output[0])
    previous = index.nodes[tail.position].output[0]
    for step in carried:
        nodes[step.position] = Node(key=step.position, label=index.labels[step.position], layer=layer)
        data_of[step.position] = previous
        previous = index.nodes[step.position].output[0]
    if tail.refusal is not None:
        where, why = tail.refusal
        nodes[where] = Node(key=where, label=index.labels[where], refusal=why)
        data_of[where] = previous
    return layer


_LAYOUT_OPS = ("Transpose", "Reshape", "Flatten", "Squeeze", "Unsqueeze")


def _mark_layout(node: Node, onnx_node: onnx.NodeProto, in_shape: tuple[int | None, ...] | None,
                 out_shape: tuple[int | None, ...] | None) -> None:
    """A Transpose (with its permutation), or a reshaping op that keeps axes 0 and 1 (each (sample, channel) block
    only re-laid out): what a BN can fold through (:func:`bnfold.discover.rules._passing`)."""
    if onnx_node.op_type == "Transpose":
        perm = attributes(onnx_node).get("perm")
        if perm is None and in_shape is not None:
            perm = list(reversed(range(len(in_shape))))
        if perm is not None:
            node.op, node.perm = "transpose", tuple(int(p) for p in perm)
        return
    if in_shape is None or out_shape is None or len(in_shape) < 2 or len(out_shape) < 2:
        return
    if in_shape[1] is None or in_shape[1] != out_shape[1]:
        return
    samples = in_shape[0] is not None and in_shape[0] == out_shape[0]
    rest_in, rest_out = in_shape[2:], out_shape[2:]
    same_rest = None not in rest_in and None not in rest_out and np.prod(rest_in) == np.prod(rest_out)
    if samples or same_rest:  # with the channels equal, equal blocks leave the sample count as it was
        node.op = "reshape"


def _inference_dropout(node: onnx.NodeProto, index: GraphIndex) -> bool:
    """A Dropout that computes its input: no ``training_mode`` input (opset 12+) or a constant false one, and its
    mask output unread. (A training-mode Dropout is random at inference: BN009.)"""
    if len(node.output) > 1 and node.output[1] and index.users(node.output[1]):
        return False
    if len(node.input) < 3 or not node.input[2]:
        return True
    tensor = index.tensor(node.input[2])
    if tensor is None or node.input[2] in index.inputs or tensor.data_location == TensorProto.EXTERNAL:
        return False
    try:
        return not bool(np.asarray(numpy_helper.to_array(tensor)).any())
    except (ValueError, TypeError):
        return False


def _zero_constants(index: GraphIndex) -> set[str]:
    """Zero scalars (an exporter's ``0 + x``): an Add with one adds nothing. Only a scalar or a single-element
    vector: a larger zero tensor could broadcast the sum to another shape."""
    found = set()
    for name in index.constants:
        tensor = index.tensor(name)
        if (tensor is None or name in index.inputs or tuple(tensor.dims) not in ((), (1,))
                or tensor.data_location == TensorProto.EXTERNAL
                or tensor.data_type not in (*FLOAT_TYPES, TensorProto.INT32, TensorProto.INT64)):
            continue
        try:
            if not np.any(numpy_helper.to_array(tensor)):
                found.add(name)
        except (ValueError, TypeError):  # malformed data: not a known zero
            continue
    return found


def _mark_structure(node: Node, onnx_node: onnx.NodeProto, index: GraphIndex, zeros: set[str]) -> None:
    """An Add, Sum, Sub, Identity (or a Dropout that is one), Mul by a per-channel constant, or Concat, for the
    structural rules (and for a BN after a layer through an Identity)."""
    def constant(name: str) -> bool:
        return not name or name in index.constants or (name in index.inputs and name in index.initializers)

    op = onnx_node.op_type
    names = list(onnx_node.input)
    if op == "Dropout":
        if not _inference_dropout(onnx_node, index):
            return
        op, names = "Identity", names[:1]
    if op in ("Add", "Sum") and len(names) > 1:
        names = [name for name in names if name not in zeros] or names[:1]
    operands = [(None, None) if constant(name) else (name, index.producer.get(name)) for name in names]
    if op == "Mul":
        data = [i for i, name in enumerate(names) if not constant(name)]
        if len(names) != 2 or len(data) != 1 or node.rank is None:
            return
        factor = names[1 - data[0]]
        const = index.constants.get(factor)
        if (const is None or const.data_type not in FLOAT_TYPES or index.not_constant(factor, "scale")
                or not per_channel(const.shape, node.rank)):
            return
        node.op, node.operands, node.factor = "mul", [operands[data[0]]], Factor(factor)
        return
    if op in ("Sub", "Identity") and len(operands) != (2 if op == "Sub" else 1):
        return
    node.op = {"Concat": "concat", "Sub": "sub", "Identity": "identity"}.get(op, "add")
    node.operands = operands
    if op == "Concat":
        axis = int(attributes(onnx_node).get("axis", 1))
        node.axis = axis + node.rank if axis < 0 and node.rank is not None else axis


def plan(found: Translation) -> Discovery:
    """Pair with the shared rules (each node's ``refusal`` included), then apply what only ONNX knows: a BN
    before a Gemm with transA=1 normalises that Gemm's rows, not its features."""
    paired = pair(found.nodes, "onnx")
    folds: list[Fold] = []
    skips: list[Skip] = list(paired.skips)
    for fold in paired.folds:
        if fold.position == "before" and fold.layer.name in found.rows_as_input:
            skips.append(Skip(fold.bn.name, f"feeds Gemm {fold.layer.name} with transA=1: the BN's channels are that "
                                            "Gemm's output rows, not its input features", "transposed-input"))
        else:
            folds.append(fold)
    return Discovery(folds=folds, skips=skips + found.nested_bns, method="onnx", notes=list(found.notes),
                     merges=paired.merges, bns=paired.bns, neighbours=paired.neighbours, tails=found.tails)


# -- reading and writing tensors -----------------------------------------------------------------------------
def to_float64(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(array, dtype=np.float64, order="C"))  # a copy: never aliases the proto


def to_stored(value: torch.Tensor, data_type: int) -> np.ndarray:
    """``value`` rounded once to the stored element type (by torch, as the module side rounds)."""
    cast = value.detach().to(FLOAT_TYPES[data_type]).contiguous()
    if data_type == TensorProto.BFLOAT16:
        return cast.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return cast.numpy()


def _set_tensor_data(tensor: TensorProto, array: np.ndarray) -> None:
    """Replace ``tensor``'s dims and data, keeping its name, doc string, metadata and element type."""
    fresh = numpy_helper.from_array(array)
    assert fresh.data_type == tensor.data_type, (fresh.data_type, tensor.data_type)
    for name in ("float_data", "int32_data", "double_data", "int64_data", "uint64_data", "string_data",
                 "external_data", "dims"):
        tensor.ClearField(name)
    tensor.ClearField("data_location")
    tensor.dims.extend(fresh.dims)
    tensor.raw_data = fresh.raw_data


@dataclass(frozen=True)
class _Layout:
    """How a tensor read at one input slot is shown to the math: transposed, scaled by alpha or beta."""

    transpose: bool = False
    scale: float = 1.0
    reset: str | None = None  # the attribute set to 1.0 once the scale lives in the tensor ("alpha"/"beta")


_IDENTITY = _Layout()


def _layout(node: onnx.NodeProto, slot: int) -> _Layout:
    """Torch layout: a weight is ``(out, in)``. A Gemm B is ``(K, N)`` unless transB=1, a MatMul weight ``(K, N)``.

    Gemm's alpha and beta are folded into B and C in float64 (and set to 1 when written) rather than kept and
    divided out again: keeping them would round twice (``t / beta`` and the stored value), folding rounds once.
    """
    if node.op_type == "MatMul" and slot == 1:
        return _Layout(transpose=True)
    if node.op_type == "Gemm" and slot in (1, 2):
        attrs = attributes(node)
        if slot == 1:
            return _Layout(transpose=attrs.get("transB", 0) == 0, scale=float(attrs.get("alpha", 1.0)), reset="alpha")
        return _Layout(scale=float(attrs.get("beta", 1.0)), reset="beta")
    return _IDENTITY


def _set_attribute(node: onnx.NodeProto, name: str, value: float) -> None:
    kept = [a for a in node.attribute if a.name != name]
    del node.attribute[:]
    node.attribute.extend(kept + [onnx.helper.make_attribute(name, value)])


class OnnxHost:
    """Tensors of one ONNX model by name, for :func:`bnfold.fold.apply.apply_fold`; edits the model in place.

    Call :meth:`claim` on each fold before applying it (it gives the layer tensors of its own when others read
    them too) and :meth:`finish` once at the end (it writes the node list and drops what nothing uses);
    :func:`bnfold.fold.apply.apply_plan` does both.
    """

    rewrites = False  # edits this graph; never handed another one

    def __init__(self, model: onnx.ModelProto, tails: dict[str, Tail] | None = None) -> None:
        self.model = model
        self._tails = dict(tails or {})  # layer label -> its affine tail (Discovery.tails), folded once
        graph = model.graph
        # The graph's nodes by position, edited in place, kept indexed by every edit below, listed again by finish().
        self._index = GraphIndex.of(graph)
        self._by_label = {label: position for position, label in enumerate(self._index.labels)}
        self._written = len(self._index.nodes)  # nodes the graph came with; those after them are added here
        self._dropped: set[int] = set()  # positions of removed nodes
        self._after: dict[int, list[int]] = {}  # position -> positions of the nodes inserted right after it
        self._bias_adds: dict[str, tuple[int, int]] = {}  # MatMul label -> (Add position, slot) of its bias
        self._absorbed: set[str] = set()  # labels of layers whose tail is folded into them (claim_layer)
        # A layer's weight and bias once its tail is folded in, in float64 until a BN fold writes them: the stored
        # copies are rounded already, and the fold must round only once.
        self._exact: dict[str, torch.Tensor] = {}
        self._names = set(self._index.initializers) | self._index.inputs | set(self._index.outputs) | {
            name for _, node in _labelled(graph) for name in (*node.input, *node.output, node.name) if name}
        self.notes: list[str] = []

    # -- the host interface of apply_fold
    def get(self, path: str) -> torch.Tensor:
        if path in self._exact:
            return self._exact[path].clone()
        layouts = {_layout(node, slot) for node, slot in self._index.reading(path)} or {_IDENTITY}
        if len(layouts) > 1:
            raise CannotFold(f"tensor '{path}' is read in different layouts by several nodes")
        return self._shown(path, layouts.pop())

    def _get_at(self, position: int, slot: int) -> torch.Tensor:
        """What the node at ``position`` reads at ``slot``, as :meth:`get` shows it (whatever other readers of the
        same tensor make of it)."""
        name = self._index.nodes[position].input[slot]
        if name in self._exact:
            return self._exact[name].clone()
        return self._shown(name, _layout(self._index.nodes[position], slot))

    def _shown(self, name: str, layout: _Layout) -> torch.Tensor:
        """The stored tensor ``name`` in float64, as ``layout`` presents it to the math."""
        value = to_float64(self._array(name))
        if layout.scale != 1.0:
            value = value * layout.scale
        return value.T if layout.transpose else value

    def set(self, path: str, value: torch.Tensor) -> None:
        readers = self._index.reading(path)
        layout = _layout(*readers[0]) if readers else _IDENTITY
        assert self._index.users(path) <= 1, f"{path} is shared: claim() the fold before writing"
        self._exact.pop(path, None)
        value = value.T if layout.transpose else value
        self._write(path, to_stored(value, self._stored(path).data_type))
        if layout.reset and layout.scale != 1.0:  # the scale now lives in the tensor
            _set_attribute(readers[0][0], layout.reset, 1.0)

    def dtype(self, path: str) -> torch.dtype:
        return FLOAT_TYPES[self._stored(path).data_type]

    def check(self, fold: Fold) -> None:
        pass  # every BatchNormalization is plain; what cannot fold was decided by plan()

    def add_bias(self, layer: LayerRef) -> str:
        """A zero bias for ``layer``: input C / B of Gemm and Conv, or a new ``Add`` after a MatMul."""
        position = self._by_label[layer.name]
        node = self._index.nodes[position]
        name = self._new_initializer(f"{layer.weight}_bias", to_stored(torch.zeros(self._out_channels(layer, node)),
                                                                       self._stored(layer.weight).data_type))
        if node.op_type != "MatMul":
            with self._index.editing(position):
                node.input.extend([""] * (3 - len(node.input)))
                node.input[2] = name
            return name
        result, inner = node.output[0], self._fresh(f"{node.output[0]}_matmul")
        with self._index.editing(position):
            node.output[0] = inner
        added = self._index.add(onnx.helper.make_node("Add", [inner, name], [result],
                                                      name=self._fresh(f"{layer.name}_bias")))
        self._after.setdefault(position, []).append(added)
        self._bias_adds[layer.name] = (added, 1)
        return name

    def remove_bn(self, ref: BNRef) -> None:
        """Take the BatchNormalization out: its input takes over its output name, or its readers read its input.
        A BN that folded through a Transpose and its inverse leaves the two next to each other: they go too."""
        position = self._by_label[ref.name]
        source = self._index.nodes[position].input[0]
        self._bypass(position)
        producer = self._index.producer.get(source)
        if producer is None:  # renamed: the producer writes the BN's output now
            producer = self._index.producer.get(self._index.nodes[position].output[0])
        if producer is not None:
            self._cancel_inverse(producer)

    def _bypass(self, position: int) -> None:
        """Take the one-input node at ``position`` out: its input's producer writes its output name (when nothing
        else reads the input), or its readers read its input."""
        node = self._index.nodes[position]
        source, result = node.input[0], node.output[0]
        producer = self._index.producer.get(source)
        renamable = self._renamable(source)
        if not renamable and not self._rewirable(result):
            raise CannotFold(f"output '{result}' is a graph output or read inside a subgraph, and input '{source}' "
                             "cannot be renamed to it")
        self._index.forget(position)
        self._dropped.add(position)
        if renamable:  # the producer writes the node's output name: graph outputs and subgraph reads keep working
            with self._index.editing(producer) as writer:
                writer.output[list(writer.output).index(source)] = result
            return
        for reader, slot in list(self._index.readers.get(result, ())):
            self._rewire(reader, slot, source)

    def _renamable(self, name: str) -> bool:
        """Whether the node writing ``name`` may write another name instead: nothing else reads ``name``."""
        return name in self._index.producer and name not in self._index.outputs and self._index.users(name) == 1

    def _rewirable(self, name: str) -> bool:
        """Whether every reader of ``name`` can be made to read another name: no graph output, no subgraph."""
        return name not in self._index.outputs and name not in self._index.nested

    def _cancel_inverse(self, second: int) -> None:
        """Drop the Transpose at ``second`` and the one before it when they undo each other (tf2onnx's pair around a
        BN, once the BN is gone) and nothing else reads the first one's output; otherwise leave both."""
        node = self._index.nodes[second]
        first = self._index.producer.get(node.input[0]) if node.input else None
        if first is None or node.op_type != "Transpose" or node.domain not in ("", "ai.onnx"):
            return
        before = self._index.nodes[first]
        if before.op_type != "Transpose" or before.domain not in ("", "ai.onnx") or not self._renamable(node.input[0]):
            return
        perms = [attributes(n).get("perm") for n in (before, node)]
        if None in perms or not inverse(tuple(perms[0]), tuple(perms[1])):
            return
        if not self._renamable(before.input[0]) and not self._rewirable(node.output[0]):
            return
        self._bypass(second)  # ``first`` now writes ``result``
        self._bypass(first)

    # -- ONNX only
    def claim_layer(self, layer: LayerRef) -> LayerRef:
        """``layer`` with its current tensors, each read by the layer alone (copied when shared), its affine tail
        folded in.

        A weight two nodes read must not change for the one that keeps its BN: the folding node gets a copy
        under a new name. The bias is looked up again, since an earlier fold into the same layer may have added
        one. The nodes of the layer's affine tail that carry it (see the module docstring) are folded into it
        first (:meth:`_absorb_tail`): a BN after them folds as if it followed the layer. The rest of the tail is
        :meth:`fold_tails`'s (a scale in a sum that branch merging reads is left to the merge).
        """
        return self._claim(layer, whole=False)

    def _claim(self, layer: LayerRef, *, whole: bool) -> LayerRef:
        position = self._by_label[layer.name]
        tail = self._tails.get(layer.name)
        if tail is not None and layer.name not in self._absorbed:
            self._absorb_tail(tail, tail.steps if whole else tail.carried)
        weight = self._own(position, 1, layer.name, "weight")
        found = self._bias_slot(layer, position)
        bias = self._own(*found, layer.name, "bias") if found is not None else None
        return dataclasses.replace(layer, weight=weight, bias=bias)

    def fold_tails(self, keep: set[str] = frozenset()) -> tuple[list[AffineFold], list[str]]:
        """Fold every affine tail that takes a node out of the graph into its layer, but those with a node in
        ``keep`` (the nodes of planned merges, which name them): what was folded, and a note for each tail the
        tensors refuse (it stays as it was)."""
        folded, notes = [], []
        for label, tail in self._tails.items():
            labels = tuple(s.label for s in tail.ops)
            if label in self._absorbed or tail.removes < 1 or keep.intersection((label, *labels)):
                continue
            try:
                self._claim(tail.layer, whole=True)
            except CannotFold as exc:
                notes.append(f"{' -> '.join(labels)} after {label} not folded: {exc}")
                continue
            folded.append(AffineFold(label, labels, tuple(s.op for s in tail.ops)))
        return folded, notes

    def _own(self, position: int, slot: int, label: str, role: str) -> str:
        """The name the node at ``position`` reads at ``slot``, copied first when other nodes read it too."""
        name = self._index.nodes[position].input[slot]
        if self._index.users(name) > 1:
            copy = self._new_initializer(f"{name}_{label}", self._array(name))
            if name in self._exact:
                self._exact[copy] = self._exact[name]
            self._rewire(position, slot, copy)
            self.notes.append(f"{label}: {role} '{name}' is read by other nodes too; folded into a copy '{copy}'")
            name = copy
        return name

    def merge(self, merge: Merge) -> None:
        """The merged conv writes the Add's output; the Add tree, the BNs and the other convs are dropped."""
        missing = [n for n in (merge.root, merge.target_node, *merge.removed) if n not in self._by_label]
        if missing:
            raise CannotFold(f"the graph has no node {missing[0]}")
        root, target = self._by_label[merge.root], self._by_label[merge.target_node]
        doomed = [root, *(self._by_label[n] for n in merge.removed)]
        if any(position in self._dropped for position in (*doomed, target)):
            raise CannotFold("a node of this merge was already taken out by another fold")
        for position in doomed:
            self._index.forget(position)
            self._dropped.add(position)
        with self._index.editing(target) as node:
            node.output[0] = self._index.nodes[root].output[0]

    def finish(self) -> None:
        """Write the edited node list and drop initializers, Constants and value_info nothing uses any more."""
        graph = self.model.graph
        index = self._index
        read = set(index.outputs) | set(index.nested) | {n for n, readers in index.readers.items() if readers}
        nodes = [n for n in self._live() if _constant_of(n) is None or n.output[0] in read]
        _replace_repeated(graph.node, nodes, onnx.NodeProto)
        unused = [t for t in graph.initializer if t.name not in read and t.name not in index.inputs]
        if unused:
            size = sum(t.ByteSize() for t in unused)
            self.notes.append(f"dropped {len(unused)} initializer(s) nothing reads ({size / 2**20:.2f} MiB)")
            _replace_repeated(graph.initializer, [t for t in graph.initializer if t.name in read or
                                                  t.name in index.inputs], TensorProto)
        written = {name for node in graph.node for name in node.output}
        if any(v.name not in written for v in graph.value_info):
            _replace_repeated(graph.value_info, [v for v in graph.value_info if v.name in written],
                              onnx.ValueInfoProto)

    # -- helpers
    def _live(self) -> Iterator[onnx.NodeProto]:
        for position in range(self._written):
            if position not in self._dropped:
                yield self._index.nodes[position]
            yield from (self._index.nodes[added] for added in self._after.get(position, ()))

    def _rewire(self, position: int, slot: int, name: str) -> None:
        with self._index.editing(position) as node:
            node.input[slot] = name

    def _bias_slot(self, layer: LayerRef, position: int) -> tuple[int, int] | None:
        """Where ``layer``'s bias is read once its tail is folded in: (node position, input slot), None when it
        has none."""
        node = self._index.nodes[position]
        if node.op_type != "MatMul":
            return (position, 2) if len(node.input) > 2 and node.input[2] else None
        return self._bias_adds.get(layer.name)

    def _absorb_tail(self, tail: Tail, steps: tuple[Step, ...]) -> None:
        """Fold ``steps`` (the layer's whole affine tail, or its carried nodes) into the layer, once: ``a * (W x +
        b) + c`` is ``(a W) x + (a b + c)``, with ``a`` and ``c`` the product of the scales and the sum of the
        shifts, per channel, in float64 (``b`` the layer's own bias, or zero; a Gemm's alpha and beta included).
        A weight other nodes read too is copied first, once the fold is sure.

        The elementwise nodes go; the node before the first of them (the layer, or a Transpose the tail reads
        through) writes the last one's output name. A MatMul, which has no bias input, keeps the last one as
        ``Add(matmul, bias)`` when the tail shifts. Everything is checked before anything is written."""
        label, position = self._index.labels[tail.position], tail.position
        if not steps:
            return
        node = self._index.nodes[position]
        if any(p in self._dropped for p in (position, *(s.position for s in steps))):
            raise CannotFold(f"a node of {label}'s tail was already taken out by another fold")
        ops_steps = [s for s in steps if s.op != "Transpose"]
        channels = self._out_channels(tail.layer, node)
        scale = torch.ones(channels, dtype=torch.float64)
        shift = torch.zeros(channels, dtype=torch.float64)
        for step in ops_steps:
            value = to_float64(self._array(step.constant)).reshape(-1)
            if value.numel() not in (1, channels):
                raise CannotFold(f"constant '{step.constant}' has {value.numel()} values, {label} {channels} channels")
            if not torch.isfinite(value).all() or (step.op == "Div" and (value == 0).any()):
                raise CannotFold(f"constant '{step.constant}' of {self._index.labels[step.position]} is not finite "
                                 "(or divides by zero)")
            if step.op in _SCALES:
                value = value if step.op == "Mul" else 1.0 / value
                scale, shift = scale * value, shift * value
            else:
                shift = shift + (value if step.op == "Add" else -value)
        own = self._bias_slot(tail.layer, position)
        bias = self._get_at(*own) if own is not None else None
        stats = BNParams(mean=torch.zeros(channels, dtype=torch.float64), var=torch.ones(channels, dtype=torch.float64),
                         eps=0.0, gamma=scale, beta=shift)  # BN(z) = scale * z + shift, exactly
        groups = tail.layer.groups if tail.layer.kind == "conv_transpose" else 1
        try:  # in float64: the host presents every tensor so
            new_w, new_b = fold_bn_after(self._get_at(position, 1), bias, stats,
                                         channel_axis=tail.layer.out_channel_axis, groups=groups)
        except ValueError as exc:
            raise CannotFold(str(exc)) from None
        stored = FLOAT_TYPES[self._stored(node.input[1]).data_type]
        if not (torch.isfinite(new_w.to(stored)).all() and torch.isfinite(new_b.to(stored)).all()):
            raise CannotFold(f"the weights of {label} overflow {stored} once its tail is folded in")
        weight = self._own(position, 1, label, "weight")  # checked: now the layer's tensors may be written
        shifts = any(s.op not in _SCALES for s in ops_steps) or own is not None
        self._absorbed.add(label)
        self.set(weight, new_w)
        self._exact[weight] = new_w
        bias_name = None
        if shifts:
            bias_name = self._new_initializer(f"{weight}_bias", to_stored(new_b, self._stored(weight).data_type))
        ops = [s.position for s in ops_steps]
        last = self._index.nodes[ops[-1]]
        written = last.output[0]
        if tail.matmul and bias_name is not None:  # the last elementwise node adds the MatMul's bias
            with self._index.editing(ops[-1]):
                last.op_type = "Add"
                del last.input[:]
                last.input.extend([node.output[0], bias_name])
            self._bias_adds[label] = (ops[-1], 1)
            ops, written = ops[:-1], None
        for gone in ops:
            self._index.forget(gone)
            self._dropped.add(gone)
        kept = [position, *(s.position for s in steps if s.op == "Transpose")]
        for before, after in zip(kept, kept[1:]):  # each Transpose reads the node kept before it
            self._rewire(after, 0, self._index.nodes[before].output[0])
        if written is not None:
            with self._index.editing(kept[-1]) as writer:
                writer.output[0] = written
        if bias_name is not None and not tail.matmul:  # input B of a Conv/ConvTranspose, C of a Gemm
            with self._index.editing(position):
                node.input.extend([""] * (3 - len(node.input)))
                node.input[2] = bias_name
            self.set(bias_name, new_b)  # through set(): a Gemm's beta becomes 1 once it lives in the tensor
        if bias_name is not None:
            self._exact[bias_name] = new_b

    def _out_channels(self, layer: LayerRef, node: onnx.NodeProto) -> int:
        """``layer``'s output channels, from its weight as stored (a Gemm B or MatMul weight ``(K, N)``: N)."""
        weight = self._stored(layer.weight)
        shape = weight.shape[::-1] if _layout(node, 1).transpose else weight.shape
        return shape[1] * layer.groups if layer.kind == "conv_transpose" else shape[0]

    def _constant(self, name: str) -> onnx.NodeProto:
        """The ``Constant`` node writing ``name`` (a constant that is not an initializer)."""
        return self._index.nodes[self._index.producer[name]]

    def _array(self, name: str) -> np.ndarray:
        tensor = self._index.tensor(name)
        if tensor is not None:
            return numpy_helper.to_array(tensor)
        return np.asarray(onnx.helper.get_attribute_value(self._constant(name).attribute[0]), dtype=np.float32)

    def _stored(self, name: str) -> _Const:
        """The element type and shape ``name`` is stored with now."""
        if name in self._index.initializers:
            return _Const.of(self._index.initializers[name])
        const = _constant_of(self._constant(name))
        assert const is not None
        return const

    def _write(self, name: str, array: np.ndarray) -> None:
        tensor = self._index.tensor(name)
        if tensor is not None:
            _set_tensor_data(tensor, array)
            return
        node = self._constant(name)  # value_float(s): becomes a tensor of the same type
        del node.attribute[:]
        node.attribute.extend([onnx.helper.make_attribute("value", numpy_helper.from_array(array))])

    def _new_initializer(self, base: str, array: np.ndarray) -> str:
        name = self._fresh(base)
        tensor = self.model.graph.initializer.add()
        tensor.CopyFrom(numpy_helper.from_array(array, name))
        self._index.initializers[name] = tensor
        self._index.constants[name] = _Const.of(tensor)
        return name

    def _fresh(self, base: str) -> str:
        name, n = base, 1
        while name in self._names:
            n += 1
            name = f"{base}_{n}"
        self._names.add(name)
        return name


def _replace_repeated(field, items: list, message_type) -> None:
    """Set a repeated message field to ``items`` (which may be its own elements: they are copied first)."""
    copies = [message_type() for _ in items]
    for copy, item in zip(copies, items):
        copy.CopyFrom(item)
    del field[:]
    field.extend(copies)
