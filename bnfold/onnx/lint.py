"""Lint an ONNX graph: BN009 (training-mode BatchNormalization or Dropout) and BN011 (a foldable BN left in).

"Foldable" is decided by the same rule set that ``bnfold fuse model.onnx`` applies
(:func:`bnfold.onnx.fold.discover_graph`), so the lint never promises a fold that fuse would refuse.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from bnfold.findings import Finding
from bnfold.onnx.fold import discover_graph
from bnfold.onnx.graph import GraphIndex, attributes


def lint(model: onnx.ModelProto, base_dir: Path | None = None) -> list[Finding]:
    """BN009 (training-mode BatchNormalization/Dropout) and BN011 (a foldable BatchNormalization left in).

    ``base_dir`` is where external tensor data lives (the model file's folder).
    """
    findings = []
    index = GraphIndex.of(model.graph)
    constant = _constant_names(index)
    for name, node in zip(index.labels, index.nodes):
        if node.op_type == "BatchNormalization":
            attrs = attributes(node)
            if node.input and node.input[0] in constant:
                continue  # normalises a weight (weight standardisation), not a batch
            if attrs.get("training_mode", 0) == 1 or len(node.output) > 1:
                findings.append(Finding("BN009", name, "BatchNormalization with training_mode=1: it normalises "
                                                       "with batch statistics at inference"))
        elif node.op_type == "Dropout" and len(node.input) > 2 and node.input[2]:
            tensor = index.tensor(node.input[2])  # an initializer listed as an input too: its default
            flag = None if tensor is None else numpy_helper.to_array(tensor, base_dir=str(base_dir or ""))
            if flag is None or bool(np.asarray(flag).item()):
                state = "true" if flag is not None else "a graph input (may be true)"
                findings.append(Finding("BN009", name, f"Dropout with training_mode {state}: random at inference"))
    try:
        plan = discover_graph(model)
    except Exception:  # noqa: BLE001 - a graph the folder cannot read (unknown op...) has nothing to promise
        return findings
    for fold in plan.folds:
        if fold.position in ("after", "before"):
            where = "follows" if fold.position == "after" else "feeds"
            message = f"{where} {fold.layer.name} and could be folded into its weights"
        else:
            message = f"could be removed: {fold.describe()}"
        findings.append(Finding("BN011", fold.bn.name, message))
    return findings


def _constant_names(index: GraphIndex) -> set[str]:
    """Names computed from constants alone (not from any graph input)."""
    constant = {name for name in index.constants if name not in index.inputs}
    for node in index.nodes:
        if node.input and all(not n or n in constant for n in node.input):
            constant.update(o for o in node.output if o)
    return constant
