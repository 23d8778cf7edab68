"""Layer weights an ONNX graph computes from constants alone, evaluated once so that a BN can fold into them.

An exporter writes a weight-standardised conv (timm's ``StdConv2d``) as ``Reshape -> BatchNormalization
(training_mode=1) -> Reshape -> Conv``: the weight is a pure function of stored tensors, the same on every run.
In PyTorch bnfold must refuse to fold into it (the stored parameter is not what the conv sees); in the graph
the computed value *is* a constant, and once it is one, the BN after the conv folds exactly. onnxruntime and
onnxslim constant-fold the same way.

Only what cannot surprise is evaluated: standard-domain operators from :data:`FOLDABLE_OPS` (reshapes,
arithmetic, reductions, normalisation), no subgraphs, at most :data:`MAX_NODES` nodes whose every output is read
only by the chain or the layer, and tensors (each intermediate, by shape inference first) of at most
:data:`MAX_ELEMENTS` elements. The evaluation is onnx's reference implementation (numpy, in process), in the
graph's own dtypes, as a runtime would compute it.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from bnfold.onnx.graph import GraphIndex

FOLDABLE_OPS = frozenset({
    "Identity", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose", "Cast", "Add", "Sub", "Mul", "Div", "Neg",
    "Abs", "Sqrt", "Reciprocal", "Pow", "ReduceMean", "ReduceSum", "ReduceSumSquare", "ReduceL2", "ReduceMax",
    "BatchNormalization", "Shape", "Gather", "Concat", "Constant",
})
MAX_NODES = 64
MAX_ELEMENTS = 1 << 24  # 64 MiB of float32 per tensor
_LAYER_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def computed_weights(model: onnx.ModelProto) -> bool:
    """Whether some layer reads a weight or bias that a non-Constant node computes (cheap: no evaluation)."""
    index = GraphIndex.of(model.graph)
    return any(_computed(index, name) for node in index.nodes if node.op_type in _LAYER_OPS for name in node.input[1:3])


def _computed(index: GraphIndex, name: str) -> bool:
    """Whether a node other than a ``Constant`` writes ``name``."""
    return name in index.producer and index.nodes[index.producer[name]].op_type != "Constant"


def fold_constant_weights(model: onnx.ModelProto) -> list[str]:
    """Replace, in place, every computed layer weight or bias that is a pure function of constants by its value;
    returns a note per replacement."""
    graph = model.graph
    index = GraphIndex.of(graph)
    initializers = {name: t for name, t in index.initializers.items() if name not in index.inputs}
    notes: list[str] = []
    drop: set[int] = set()
    values: list[onnx.TensorProto] = []
    for position, node in enumerate(index.nodes):
        if node.op_type not in _LAYER_OPS or node.domain not in ("", "ai.onnx"):
            continue
        for name in list(node.input[1:3]):
            chain = _chain(index, name, initializers, position)
            if not chain or chain & drop:
                continue
            value = _evaluate(model, sorted(chain), name, initializers)
            if value is None:
                continue
            drop |= chain
            values.append(numpy_helper.from_array(value, name))
            notes.append(f"{index.labels[position]}: its input '{name}' is computed from constants alone "
                         f"({len(chain)} node(s): {', '.join(sorted({index.nodes[i].op_type for i in chain}))}); it "
                         "was evaluated once so that a BN can fold into it")
    if drop:
        kept = [n for i, n in enumerate(graph.node) if i not in drop]
        del graph.node[:]
        graph.node.extend(kept)
        graph.initializer.extend(values)
        used = {name for n in graph.node for name in n.input} | set(index.outputs) | set(index.nested)
        kept_init = [t for t in graph.initializer if t.name in used or t.name in index.inputs]
        if len(kept_init) != len(graph.initializer):
            del graph.initializer[:]
            graph.initializer.extend(kept_init)
    return notes


def _chain(index: GraphIndex, name: str, initializers: dict[str, onnx.TensorProto], layer: int) -> set[int]:
    """The nodes computing ``name`` from constants, each read only inside the chain or by ``layer`` (never as a
    graph output, and but for ``name``, which stays defined as an initializer, never inside a subgraph); empty
    when ``name`` is not such a value."""
    if not name or not _computed(index, name):
        return set()
    chain: set[int] = set()
    stack = [index.producer[name]]
    while stack:
        position = stack.pop()
        if position in chain:
            continue
        node = index.nodes[position]
        if (node.op_type not in FOLDABLE_OPS or node.domain not in ("", "ai.onnx")
                or any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute)):
            return set()
        chain.add(position)
        if len(chain) > MAX_NODES:
            return set()
        for source in node.input:
            if not source or source in initializers:
                continue
            if source not in index.producer:
                return set()  # a graph input: not a constant
            stack.append(index.producer[source])
    for position in chain:
        for out in index.nodes[position].output:
            readers = {reader for reader, _ in index.readers.get(out, ())}
            nested = out != name and out in index.nested
            if out and (out in index.outputs or nested or not readers <= chain | {layer}):
                return set()
    return chain


def _evaluate(model: onnx.ModelProto, chain: list[int], name: str,
              initializers: dict[str, onnx.TensorProto]) -> np.ndarray | None:
    """The value of ``name`` computed by the nodes ``chain`` (None when it cannot be told safely)."""
    from onnx.reference import ReferenceEvaluator

    nodes = [model.graph.node[i] for i in chain]
    needed = {n for node in nodes for n in node.input if n in initializers}
    sub = onnx.helper.make_graph(nodes, "constant_weight", [], [onnx.helper.make_empty_tensor_value_info(name)],
                                 [initializers[n] for n in sorted(needed)])
    sub_model = onnx.helper.make_model(sub, opset_imports=list(model.opset_import), ir_version=model.ir_version)
    try:
        inferred = onnx.shape_inference.infer_shapes(sub_model, strict_mode=True)
        shapes = {info.name: info.type.tensor_type.shape for info in inferred.graph.value_info
                  if info.type.tensor_type.HasField("shape")}
        for out in (o for node in nodes for o in node.output if o and o != name):
            dims = shapes[out].dim if out in shapes else None  # every intermediate's size known before it exists
            if (dims is None or any(not d.HasField("dim_value") for d in dims)
                    or int(np.prod([d.dim_value for d in dims])) > MAX_ELEMENTS):
                return None
        value = ReferenceEvaluator(sub_model).run(None, {})[0]
    except Exception:  # noqa: BLE001 - onnx raises many kinds; any of them means "leave it computed"
        return None
    value = np.asarray(value)
    if value.dtype.kind != "f" or value.size > MAX_ELEMENTS or not np.isfinite(value).all():
        return None
    return value
