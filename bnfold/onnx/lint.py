"""Lint an ONNX graph: BN009 (training-mode BatchNormalization or Dropout) and BN011 (a foldable BN left in)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from bnfold.findings import Finding

_PRODUCERS = {"Conv", "ConvTranspose", "Gemm"}


def _node_name(node: onnx.NodeProto, index: int) -> str:
    return node.name or f"{node.op_type}#{index}"


@dataclass(frozen=True)
class _GraphIndex:
    """What the lint asks of a graph, indexed once."""

    values: dict[str, onnx.TensorProto]  # initializers and Constant outputs: what the graph runs with by default
    constants: frozenset[str]  # of those, the ones nobody can change at run time
    producer: dict[str, onnx.NodeProto]
    consumers: dict[str, int]
    outputs: frozenset[str]

    @classmethod
    def of(cls, graph: onnx.GraphProto) -> _GraphIndex:
        values = {init.name: init for init in graph.initializer}
        for node in graph.node:
            if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
                values[node.output[0]] = node.attribute[0].t
        # An initializer also listed as a graph input is only a default: a caller can feed another value.
        constants = frozenset(values) - {i.name for i in graph.input}
        consumers: dict[str, int] = {}
        for node in graph.node:
            for name in node.input:
                consumers[name] = consumers.get(name, 0) + 1
        return cls(values, constants, {out: node for node in graph.node for out in node.output}, consumers,
                   frozenset(o.name for o in graph.output))


def _fold_blocker(bn: onnx.NodeProto, graph: _GraphIndex) -> str | None:
    """Why an eval-mode BatchNormalization cannot be folded into the node before it; None when it can.

    Folding rewrites the producer's weight and bias from the BN's scale, bias, mean and variance, so all of
    them must be constants, and the producer's output must feed nothing but this BN.
    """
    src = graph.producer.get(bn.input[0])
    if src is None or src.op_type not in _PRODUCERS:
        return f"its input comes from {src.op_type if src else 'a graph input'}, not Conv, ConvTranspose or Gemm"
    if graph.consumers.get(bn.input[0], 0) != 1 or bn.input[0] in graph.outputs:
        return f"the output of {src.op_type} {src.name or '(unnamed)'} is also used elsewhere"
    # The producer's inputs after the data: Conv/ConvTranspose W and optional B, Gemm B and optional C ("" = absent).
    variable = [name for name in (*bn.input[1:], *src.input[1:]) if name and name not in graph.constants]
    if variable:
        return f"{', '.join(variable)} not constant (graph input, or computed by a node)"
    return None


def lint(model: onnx.ModelProto, base_dir: Path | None = None) -> list[Finding]:
    """BN009 (training-mode BatchNormalization/Dropout) and BN011 (a foldable BatchNormalization left in).

    ``base_dir`` is where external tensor data lives (the model file's folder).
    """
    graph = _GraphIndex.of(model.graph)
    findings = []
    for index, node in enumerate(model.graph.node):
        name = _node_name(node, index)
        if node.op_type == "BatchNormalization":
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            if attrs.get("training_mode", 0) == 1 or len(node.output) > 1:
                findings.append(Finding("BN009", name, "BatchNormalization with training_mode=1: it normalises "
                                                       "with batch statistics at inference"))
            elif _fold_blocker(node, graph) is None:
                src = graph.producer[node.input[0]]
                findings.append(Finding("BN011", name, f"follows {src.op_type} {src.name or '(unnamed)'} and could "
                                                       "be folded into its weights"))
        elif node.op_type == "Dropout" and len(node.input) > 2 and node.input[2]:
            tensor = graph.values.get(node.input[2])
            flag = None if tensor is None else numpy_helper.to_array(tensor, base_dir=str(base_dir or ""))
            if flag is None or bool(np.asarray(flag).item()):
                state = "true" if flag is not None else "a graph input (may be true)"
                findings.append(Finding("BN009", name, f"Dropout with training_mode {state}: random at inference"))
    return findings
