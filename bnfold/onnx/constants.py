"""Parameters an ONNX graph computes from constants alone, evaluated once so that a BN can fold with them.

Exporters write constants that are constants in all but form: a weight-standardised conv (timm's ``StdConv2d``)
as ``Reshape -> BatchNormalization (training_mode=1) -> Reshape -> Conv``; torch.export's exporter, with
``optimize=False``, every conv bias as ``Expand(CastLike(0, x), Expand(Shape(W), [1]))``; others a ``Cast`` of a
float16 parameter, or ``Reshape``/``Unsqueeze``/``Identity`` chains on one. Each is a pure function of stored
tensors, the same on every run; once it is an initializer, the fold sees a constant. onnxruntime's basic level and
onnxslim constant-fold the same way (PyTorch is another matter: there a computed weight is no stored parameter).

What is evaluated: an input that a fold reads (:data:`READ`: a Conv/ConvTranspose/Gemm weight and bias, a MatMul's
weight, a BatchNormalization's scale, B, mean and var, the constant operand of an Add, Sub or Mul, or the divisor
of a Div, such as a bias after a MatMul, a layer scale or a hand-written BN's ``sqrt(var + eps)``, when its value
varies along one axis at most), read by a node that is not itself computed from constants.

Only what cannot surprise is evaluated: standard-domain operators from :data:`FOLDABLE_OPS` (shape and layout
operators, casts, arithmetic, reductions, normalisation; nothing random), no subgraphs, reading initializers that
are not graph inputs and ``Constant`` nodes, at most :data:`MAX_NODES` nodes whose every output is read only by the
chain or the node it feeds (never a graph output, never a subgraph but for the evaluated value, which stays defined
as an initializer). A ``CastLike``'s second operand only gives an element type: it may be any tensor whose type
the graph declares. The nodes are evaluated one at a time, in graph order, with onnx's reference implementation
(numpy, in process), in the graph's own dtypes, as a runtime would compute them; before each runs, shape inference
on its actual inputs gives the size of its outputs, and none runs whose output would exceed :data:`MAX_ELEMENTS`
elements (an ``Expand`` to 2**40 elements is never built). Tensors kept in external files are not read here.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from bnfold.onnx.graph import FLOAT_TYPES, GraphIndex

FOLDABLE_OPS = frozenset({
    "Identity", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose", "Cast", "CastLike", "Add", "Sub", "Mul",
    "Div", "Neg", "Abs", "Sqrt", "Reciprocal", "Pow", "ReduceMean", "ReduceSum", "ReduceSumSquare", "ReduceL2",
    "ReduceMax", "BatchNormalization", "Shape", "Gather", "Concat", "Slice", "Expand", "ConstantOfShape", "Constant",
})
#: The input slots of a node that a fold reads as constants, by operator.
READ = {"Conv": (1, 2), "ConvTranspose": (1, 2), "Gemm": (1, 2), "MatMul": (1,), "BatchNormalization": (1, 2, 3, 4),
        "Add": (0, 1), "Sub": (0, 1), "Mul": (0, 1), "Div": (1,)}
_PER_CHANNEL_READERS = ("Add", "Sub", "Mul", "Div")  # the structural rules read a per-channel constant, nothing larger
MAX_NODES = 64
MAX_ELEMENTS = 1 << 24  # 64 MiB of float32 per tensor
_STANDARD = ("", "ai.onnx")


@dataclass(frozen=True)
class _Graph:
    """What the search needs to know of a graph: its index, its stored constants (initializers that are not graph
    inputs), the element types it declares, and every name computed from constants alone."""

    index: GraphIndex
    stored: dict[str, TensorProto]
    types: dict[str, int]
    known: frozenset[str]

    @classmethod
    def of(cls, graph: onnx.GraphProto) -> _Graph:
        index = GraphIndex.of(graph)
        stored = {name: t for name, t in index.initializers.items() if name not in index.inputs}
        types = {t.name: t.data_type for t in graph.initializer}
        types.update((info.name, info.type.tensor_type.elem_type) for info in (*graph.input, *graph.value_info,
                                                                                 *graph.output)
                     if info.type.HasField("tensor_type") and info.type.tensor_type.elem_type)
        known: set[str] = set()
        for node in index.nodes:  # graph order is topological
            if _foldable(node) and all(not name or name in stored or name in known
                                       or (_type_only(node, slot) and name in types)
                                       for slot, name in enumerate(node.input)):
                known.update(o for o in node.output if o)
        return cls(index, stored, types, frozenset(known))

    def roots(self, position: int) -> list[str]:
        """The inputs a fold reads of the node at ``position`` that other nodes compute from constants alone (none
        when that node is computed from constants itself: it is part of a longer chain)."""
        node = self.index.nodes[position]
        slots = READ.get(node.op_type, ()) if node.domain in _STANDARD else ()
        if not slots or any(o in self.known for o in node.output):
            return []
        return list(dict.fromkeys(name for slot, name in enumerate(node.input) if slot in slots and name in self.known
                                  and self.index.nodes[self.index.producer[name]].op_type != "Constant"))


def _foldable(node: onnx.NodeProto) -> bool:
    return (node.op_type in FOLDABLE_OPS and node.domain in _STANDARD
            and not any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute))


def _type_only(node: onnx.NodeProto, slot: int) -> bool:
    """Whether ``node`` reads only the element type of its input ``slot`` (a CastLike's target)."""
    return node.op_type == "CastLike" and slot == 1


def computed_constants(model: onnx.ModelProto) -> bool:
    """Whether a fold reads some input that nodes compute from constants alone (cheap: no evaluation)."""
    found = _Graph.of(model.graph)
    return any(found.roots(position) for position in range(len(found.index.nodes)))


def fold_computed_constants(model: onnx.ModelProto) -> list[str]:
    """Replace, in place, every input a fold reads that is a pure function of constants by its value (see the
    module docstring); returns a note per node whose inputs were evaluated."""
    graph = model.graph
    found = _Graph.of(graph)
    index = found.index
    notes: list[str] = []
    drop: set[int] = set()
    leaves: set[int] = set()
    values: list[TensorProto] = []
    for position in range(len(index.nodes)):
        roots = found.roots(position)
        chain = _chain(found, roots, position) if roots else None
        if chain is None or chain[0] & drop:
            continue
        evaluated = _evaluate(model, found, sorted(chain[0] | chain[1]), roots,
                              index.nodes[position].op_type in _PER_CHANNEL_READERS)
        if evaluated is None:
            continue
        drop |= chain[0]
        leaves |= chain[1]
        values.extend(evaluated)
        ops = ", ".join(sorted({index.nodes[i].op_type for i in chain[0]}))
        notes.append(f"{index.labels[position]}: {'its inputs' if len(roots) > 1 else 'its input'} "
                     f"{', '.join(repr(r) for r in roots)} computed from constants alone ({len(chain[0])} node(s): "
                     f"{ops}) {'were' if len(roots) > 1 else 'was'} evaluated once, so that a fold can read it")
    if drop:
        _replace(graph, index, drop, leaves, values)
    return notes


def _chain(found: _Graph, roots: list[str], reader: int) -> tuple[set[int], set[int]] | None:
    """(the nodes computing ``roots``, each read only inside the chain or by ``reader``; the ``Constant`` nodes they
    read, which stay while anything else reads them); None when the chain is read elsewhere or too long."""
    index = found.index
    chain: set[int] = set()
    leaves: set[int] = set()
    stack = [index.producer[name] for name in roots]
    while stack:
        position = stack.pop()
        if position in chain or position in leaves:
            continue
        node = index.nodes[position]
        if node.op_type == "Constant":
            leaves.add(position)
            continue
        chain.add(position)
        if len(chain) > MAX_NODES:
            return None
        stack.extend(index.producer[source] for slot, source in enumerate(node.input)
                     if source in index.producer and (source in found.known or not _type_only(node, slot)))
    for position in chain:
        for out in index.nodes[position].output:
            readers = {reader_ for reader_, _ in index.readers.get(out, ())}
            nested = out not in roots and out in index.nested
            if out and (out in index.outputs or nested or not readers <= chain | {reader}):
                return None
    return chain, leaves


def _evaluate(model: onnx.ModelProto, found: _Graph, nodes: list[int], roots: list[str],
              per_channel: bool) -> list[TensorProto] | None:
    """The values of ``roots`` computed by the nodes at positions ``nodes`` (None when they cannot be told safely);
    ``per_channel``: a root must vary along one axis at most."""
    from onnx.reference import ReferenceEvaluator

    values: dict[str, TensorProto] = {}
    for position in nodes:
        try:
            step, outputs = _step(model, found, found.index.nodes[position], values)
            if step is None or not _sizes_allowed(step, outputs, [r for r in roots if r in outputs] if per_channel
                                                  else []):
                return None
            results = ReferenceEvaluator(step).run(None, {})
            values.update((o, numpy_helper.from_array(np.asarray(v), o)) for o, v in zip(outputs, results))
        except Exception:  # noqa: BLE001 - onnx raises many kinds; any of them means "leave it computed"
            return None
    evaluated = [values[name] for name in roots]
    if any(t.data_type not in FLOAT_TYPES or not np.isfinite(numpy_helper.to_array(t).astype(np.float64)).all()
           for t in evaluated):
        return None
    return evaluated


def _step(model: onnx.ModelProto, found: _Graph, node: onnx.NodeProto,
          values: dict[str, TensorProto]) -> tuple[onnx.ModelProto | None, list[str]]:
    """A model of ``node`` alone, its inputs (stored, or the ``values`` computed so far) stored in it, and its
    outputs; None for a node that reads a tensor kept in an external file."""
    if _type_only(node, 1) and len(node.input) == 2 and node.input[1] not in found.known:
        cast = helper.make_node("Cast", [node.input[0]], list(node.output), to=found.types[node.input[1]])
        cast.attribute.extend(node.attribute)  # CastLike(c, data) is a Cast to data's element type
        node = cast
    inputs = [values[name] if name in values else found.stored[name] for name in dict.fromkeys(node.input) if name]
    attrs = [a.t for a in node.attribute if a.type == onnx.AttributeProto.TENSOR]
    outputs = [o for o in node.output if o]
    if any(t.data_location == TensorProto.EXTERNAL for t in (*inputs, *attrs)):
        return None, outputs  # never opens a file here: load_onnx reads external data, with its checks
    graph = helper.make_graph([node], "constant", [], [helper.make_empty_tensor_value_info(o) for o in outputs], inputs)
    return helper.make_model(graph, opset_imports=list(model.opset_import), ir_version=model.ir_version), outputs


def _sizes_allowed(step: onnx.ModelProto, outputs: list[str], per_channel: list[str]) -> bool:
    """Whether shape inference on the one-node model ``step`` (its inputs stored in it, so that shapes computed
    from values are known) tells every output's size, each within :data:`MAX_ELEMENTS`, and each of
    ``per_channel`` with one dimension other than 1 at most."""
    inferred = onnx.shape_inference.infer_shapes(step, strict_mode=True, data_prop=True)
    shapes = {info.name: info.type.tensor_type.shape for info in (*inferred.graph.value_info, *inferred.graph.output)
              if info.type.tensor_type.HasField("shape")}
    for out in outputs:
        dims = shapes[out].dim if out in shapes else None
        if dims is None or any(not d.HasField("dim_value") for d in dims):
            return False
        sizes = [d.dim_value for d in dims]
        if int(np.prod(sizes, dtype=np.float64)) > MAX_ELEMENTS or (out in per_channel
                                                                     and sum(s != 1 for s in sizes) > 1):
            return False
    return True


def _replace(graph: onnx.GraphProto, index: GraphIndex, drop: set[int], leaves: set[int],
             values: list[TensorProto]) -> None:
    """Take the evaluated nodes ``drop`` out of ``graph``, with the ``Constant`` nodes ``leaves`` nothing reads any
    more, add ``values`` as initializers, and drop the initializers nothing reads."""
    kept = [n for i, n in enumerate(graph.node) if i not in drop]
    read = {name for n in kept for name in n.input} | set(index.outputs) | set(index.nested)
    kept = [n for i, n in enumerate(graph.node)
            if i not in drop and not (i in leaves and not any(o in read for o in n.output))]
    del graph.node[:]
    graph.node.extend(kept)
    graph.initializer.extend(values)
    used = {name for n in graph.node for name in n.input} | set(index.outputs) | set(index.nested)
    kept_init = [t for t in graph.initializer if t.name in used or t.name in index.inputs]
    if len(kept_init) != len(graph.initializer):
        del graph.initializer[:]
        graph.initializer.extend(kept_init)
