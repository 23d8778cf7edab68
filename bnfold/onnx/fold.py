"""Fold the BatchNormalizations of an ONNX graph: discovery (:func:`discover_graph`) and folding (:func:`fold_graph`).

The rules are the shared ones (:func:`bnfold.discover.graph.pair`) on a translation of the graph
(:func:`bnfold.onnx.graph.translate`); the math is :mod:`bnfold.fold.math` in float64, applied by
:func:`bnfold.fold.apply.apply_plan` through :class:`bnfold.onnx.graph.OnnxHost`. Pure: no files, no onnxruntime.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import onnx

from bnfold.discover.graph import AffineFold, Discovery, Fold, Skip
from bnfold.fold.apply import apply_plan
from bnfold.onnx.constants import computed_constants, fold_computed_constants
from bnfold.onnx.graph import OnnxHost, check_supported, node_labels, plan, translate


@dataclass
class OnnxFoldResult:
    """The folded model (a new proto), what was folded, what was not and why, and what else happened."""

    model: onnx.ModelProto
    folded: list[Fold]
    skipped: list[Skip]
    notes: list[str] = field(default_factory=list)
    affine: list[AffineFold] = field(default_factory=list)  # elementwise tails folded into their layers


def discover_graph(model: onnx.ModelProto) -> Discovery:
    """Which BatchNormalization folds into which node, and why the others do not; nothing is changed.

    Raises :class:`bnfold.errors.LoadError` for a model bnfold cannot fold (opset, unknown operators).
    """
    check_supported(model)
    computed = computed_constants(model)
    if computed or listed_defaults(model):  # planned as fold_graph folds it, on a copy
        work = onnx.ModelProto()
        work.CopyFrom(model)
        return _plan(work, computed)[0]
    return _plan(model, computed)[0]


def listed_defaults(model: onnx.ModelProto) -> list[str]:
    """Initializers an IR < 4 model lists among its graph inputs. IR 3 required every initializer to be listed
    there, so the listing says nothing: onnxruntime reads them as constants (only from IR 4 on can a caller
    override an initializer listed as an input, and there bnfold refuses to fold it)."""
    if model.ir_version >= 4:
        return []
    initializers = {t.name for t in model.graph.initializer}
    return [i.name for i in model.graph.input if i.name in initializers]


def _unlist_defaults(work: onnx.ModelProto) -> list[str]:
    """Take an IR < 4 model's initializers out of its graph inputs and write it as IR 4, where that means the
    same (in place); the note, or nothing when there was none."""
    listed = set(listed_defaults(work))
    if not listed:
        return []
    kept = [i for i in work.graph.input if i.name not in listed]
    del work.graph.input[:]
    work.graph.input.extend(kept)
    old, work.ir_version = work.ir_version, 4
    return [f"IR version {old}: its {len(listed)} initializer(s) listed as graph inputs (as IR 3 required) are "
            "constants, as onnxruntime reads them; written as IR 4, which lists only the inputs a caller feeds"]


def _plan(work: onnx.ModelProto, computed: bool | None = None) -> tuple[Discovery, set[str]]:
    """Read an IR < 4 model's listed initializers as constants, evaluate the parameters ``work`` computes from
    constants (both in place: ``work`` is a copy, or the model has neither; :mod:`bnfold.onnx.constants`), then
    pair. Evaluating takes nodes out, which would move the ``OpType#index`` labels of unnamed nodes: they are named
    by their labels first, so every fold and skip names a node as the user's graph does (:func:`_unname` takes
    those names away again); the plan, and the names given. ``computed``: whether ``work`` computes constants,
    when the caller has asked already."""
    computed = computed_constants(work) if computed is None else computed
    given = _name_by_label(work) if computed else set()
    unlisted = _unlist_defaults(work)
    evaluated = fold_computed_constants(work)
    found = plan(translate(work))
    found.notes = unlisted + evaluated + found.notes
    return found, given


def _name_by_label(work: onnx.ModelProto) -> set[str]:
    """Name every unnamed node by its label (in place); the names given."""
    given = set()
    for label, node in zip(node_labels(work.graph.node), work.graph.node):
        if not node.name:
            node.name = label
            given.add(label)
    return given


def _unname(work: onnx.ModelProto, given: set[str]) -> None:
    """Take away the names :func:`_name_by_label` gave: the output keeps the input's unnamed nodes unnamed."""
    for node in work.graph.node:
        if node.name in given:
            node.name = ""


def fold_graph(model: onnx.ModelProto, *, copy: bool = True) -> OnnxFoldResult:
    """Fold every BatchNormalization that folds; ``model`` is not modified unless ``copy=False`` (then it is
    folded in place and returned as ``result.model``: one model in memory instead of two, for callers that
    have no further use for the original, such as ``bnfold fuse model.onnx``).

    The result keeps the graph's input and output names, opset imports, metadata, doc strings and producer
    fields, and drops initializers nothing reads any more. A fold that the tensors refuse (statistics that are
    not finite, weights that overflow their dtype) becomes a skip with its reason.
    """
    check_supported(model)
    work = model
    if copy:
        work = onnx.ModelProto()
        work.CopyFrom(model)
    found, given = _plan(work)
    host = OnnxHost(work, found.tails)
    merges = [*found.merges, *(f.merge for f in found.folds if f.merge is not None)]
    affine, refused_tails = host.fold_tails({n for m in merges for n in (m.root, m.target_node, *m.removed)})
    # Folds are reported as discovered: the names the user knows (a shared weight's copy is in the notes).
    folded, refused = apply_plan(host, found.folds, found.merges)
    _unname(work, given)
    return OnnxFoldResult(work, folded, refused + found.skips,
                          found.notes + found.merge_notes() + refused_tails + host.notes, affine)
