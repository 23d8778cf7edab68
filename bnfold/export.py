"""``bnfold export``: the deployment artifact, a folded ONNX file proven against the PyTorch eval model.

Stages, each timed; the first that fails stops the export and nothing is written::

    audit (error findings stop it, unless force) -> fold in PyTorch (parity with the eval model) -> export
    -> fold what the exporter left in the graph -> onnx.checker + shape inference
    -> onnxruntime vs the PyTorch eval model at batch 1 and the given batch -> atomic write

The default exporter is the torch.export-based one (``dynamo``): it is the maintained exporter, and it fails
loudly on data-dependent control flow, where the TorchScript exporter silently records the branch its example
input took (a wrong artifact that passes its own check). ``bnfold verify`` keeps the fast TorchScript exporter
for per-commit checks; ``--exporter torchscript`` is here for models the dynamo exporter cannot take.

``fp16``: the model is folded in float64 from its fp32 weights first, then cast once to float16 and exported,
so the folded fp16 weights carry one rounding, not two; parity is measured against the fp32 eval model with
the float16 tolerances.
"""

from __future__ import annotations

import copy
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx
import torch
from torch import nn

from bnfold import audit
from bnfold.compare import DEFAULT_TOLERANCES, Comparison
from bnfold.discover.graph import AffineFold, Fold, Skip
from bnfold.errors import BnfoldError, InputSpecError, first_line
from bnfold.findings import Finding
from bnfold.fold.result import FuseResult
from bnfold.fuse import fuse
from bnfold.inputs import InputSpec, make_inputs
from bnfold.kinds import Adapter, adapter_for
from bnfold.onnx.check import check_onnx
from bnfold.onnx.export import EXPORTERS, export_onnx
from bnfold.onnx.fold import discover_graph, fold_graph
from bnfold.onnx.graph import node_labels
from bnfold.onnx.io import load_onnx, save_onnx
from bnfold.onnx.runner import DEFAULT_ORT_TIMEOUT_S, OrtWorker
from bnfold.runtime import Reference, make_reference, run_model, split_examples

DEFAULT_EXPORTER = "dynamo"


class ExportError(BnfoldError):
    """The exporter could not translate the model (a limitation to work around, not a parity failure)."""


@dataclass
class ExportResult:
    """What ``export`` did. Truthy when the file was proven and written."""

    output: Path | None
    exporter: str
    findings: list[Finding] = field(default_factory=list)  # audit and ONNX findings
    torch_fold: FuseResult | None = None
    graph_folded: list[Fold] = field(default_factory=list)  # folds bnfold made in the exported graph
    graph_affine: list[AffineFold] = field(default_factory=list)  # elementwise tails folded in the exported graph
    left: list[Skip] = field(default_factory=list)  # BatchNormalization nodes left in the written graph, and why
    parity: list[Comparison] = field(default_factory=list)
    files: list[str] = field(default_factory=list)  # what was written (the model, its external data)
    stopped: str | None = None  # the stage that failed: nothing was written
    notes: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.stopped is None and bool(self.parity) and all(c.ok for c in self.parity)

    def __bool__(self) -> bool:
        return self.ok

    def to_dict(self) -> dict[str, Any]:
        fold = self.torch_fold
        return {
            "ok": self.ok,
            "stopped": self.stopped,
            "output": str(self.output) if self.output else None,
            "files": list(self.files),
            "exporter": self.exporter,
            "findings": [f.to_dict() for f in self.findings],
            "torch_folded": [f.to_dict() for f in (fold.folded if fold else [])],
            "torch_skipped": [s.to_dict() for s in (fold.skipped if fold else [])],
            "graph_folded": [f.to_dict() for f in self.graph_folded],
            "graph_affine": [a.to_dict() for a in self.graph_affine],
            "left": [s.to_dict() for s in self.left],
            "parity": [c.to_dict() for c in self.parity],
            "notes": list(self.notes),
            "timings": dict(self.timings),
        }


class _Stages:
    """Times each stage into ``result.timings``."""

    def __init__(self, result: ExportResult) -> None:
        self.result = result

    def __call__(self, name: str) -> _Stages:
        self.name = name
        return self

    def __enter__(self) -> None:
        self.start = time.perf_counter()

    def __exit__(self, *exc: Any) -> None:
        self.result.timings[self.name] = time.perf_counter() - self.start


class _KeepIOTypes(nn.Module):
    """An fp16 model behind fp32 inputs and outputs (``--keep-io-types``): the casts are part of the graph."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, *inputs: torch.Tensor) -> Any:
        cast = tuple(t.half() if t.is_floating_point() else t for t in inputs)
        return torch.utils._pytree.tree_map(
            lambda t: t.float() if isinstance(t, torch.Tensor) and t.is_floating_point() else t, self.model(*cast))


def export(
    model: Any,
    example_inputs: tuple[torch.Tensor, ...] | list[InputSpec],
    output: str | Path,
    *,
    exporter: str = DEFAULT_EXPORTER,
    opset: int | None = None,
    static_batch: bool = False,
    fp16: bool = False,
    keep_io_types: bool = False,
    external_data: bool = False,
    fold: bool = True,
    force: bool = False,
    atol: float | None = None,
    rtol: float | None = None,
    seed: int = 0,
    timeout: float | None = None,
) -> ExportResult:
    """Export ``model`` (nn.Module, ScriptModule or ExportedProgram) to a folded, verified ONNX file at ``output``.

    ``example_inputs`` are tensors (compared as they are) or input specs. ``fold=False`` exports the model as
    it is (still verified). ``force`` exports despite audit errors (they are still reported). Nothing is
    written unless every stage passes; the result says which stage stopped it.
    """
    if exporter not in EXPORTERS:
        raise InputSpecError(f"unknown exporter {exporter!r}", f"use one of {', '.join(EXPORTERS)}")
    if keep_io_types and not fp16:
        raise InputSpecError("--keep-io-types applies to --fp16 exports only")
    newest = onnx.defs.onnx_opset_version()
    if opset is not None and not 9 <= opset <= newest:
        raise InputSpecError(f"--opset {opset}: bnfold exports opsets 9 to {newest} (the newest the installed onnx "
                             "knows)")
    given, specs = split_examples(example_inputs)
    adapter = adapter_for(model)
    adapter.require("export")
    specs = adapter.specs(specs, "no example inputs: bnfold export needs the input shape")
    output = Path(output)
    result = ExportResult(output=None, exporter=exporter)
    stage = _Stages(result)
    with stage("reference"), adapter.evaluating() as runnable:
        reference = make_reference(runnable, specs, seed, given, adapter.fixed_batch)
    if adapter.subject is not None:
        with stage("audit"):
            _audit(adapter, specs, seed, result)
        if any(f.severity == "error" for f in result.findings):
            if not force:
                result.stopped = "audit"
                return result
            result.notes.append("exported despite audit errors (--force)")
    subject = adapter
    if fold:
        with stage("fold"):
            result.torch_fold = fuse(adapter, specs, atol=atol, rtol=rtol, seed=seed, reference=reference)
        result.parity += [Comparison(f"fold {c.label}", c.outputs) for c in result.torch_fold.parity]
        if not result.torch_fold.ok:
            result.stopped = "fold parity"
            return result
        subject = adapter_for(result.torch_fold.model)
    _export_and_prove(subject, reference, output, result, stage, exporter=exporter, opset=opset,
                      static_batch=static_batch, fp16=fp16, keep_io_types=keep_io_types, external_data=external_data,
                      fold=fold, atol=atol, rtol=rtol, seed=seed, timeout=timeout)
    return result


def _audit(adapter: Adapter, specs: list[InputSpec], seed: int, result: ExportResult) -> None:
    subject = adapter.subject
    assert subject is not None
    result.findings += audit.static_findings(subject)
    findings, _ = audit.probe(subject, specs, seed, has_modes=adapter.has_modes, fixed_batch=adapter.fixed_batch)
    result.findings += findings


def _exportable(subject: Adapter, fp16: bool, keep_io_types: bool, exporter: str, notes: list[str]) -> tuple[Any, str]:
    """The object handed to the exporter, and the exporter that can take it."""
    if isinstance(subject.model, torch.jit.ScriptModule) and exporter == "dynamo":
        notes.append("a TorchScript model is exported by the TorchScript exporter (dynamo cannot read it)")
        exporter = "torchscript"
    model = subject.model
    if fp16:
        module = copy.deepcopy(subject.runnable).eval().half()
        model = _KeepIOTypes(module) if keep_io_types else module
    elif isinstance(model, nn.Module):
        model = model.eval()
    return model, exporter


def _export_inputs(reference: Reference, specs: list[InputSpec], seed: int, dynamic: bool) -> tuple[torch.Tensor, ...]:
    """Inputs to trace with: the given batch, or batch 2 when it is 1 (a batch of 1 would be specialised)."""
    inputs = reference.largest.inputs
    if dynamic and inputs and inputs[0].dim() > 0 and inputs[0].shape[0] == 1:
        inputs = make_inputs(specs, seed, batch=2)
    return inputs


def _export_and_prove(subject: Adapter, reference: Reference, output: Path, result: ExportResult, stage: _Stages,
                      *, exporter: str, opset: int | None, static_batch: bool, fp16: bool, keep_io_types: bool,
                      external_data: bool, fold: bool, atol, rtol, seed: int, timeout: float | None) -> None:
    model, exporter = _exportable(subject, fp16, keep_io_types, exporter, result.notes)
    result.exporter = exporter
    dynamic = not static_batch and not subject.fixed_batch
    inputs = _export_inputs(reference, reference.specs, seed, dynamic)
    half_inputs = fp16 and not keep_io_types
    if half_inputs:
        inputs = tuple(t.half() if t.is_floating_point() else t for t in inputs)
    if fp16 and (atol is None or rtol is None):
        d_atol, d_rtol = DEFAULT_TOLERANCES["float16"]
        atol, rtol = (d_atol if atol is None else atol), (d_rtol if rtol is None else rtol)
        result.notes.append(f"fp16 graph compared with the fp32 eval model at float16 tolerances (atol {atol:g}, "
                            f"rtol {rtol:g})")
    with OrtWorker(timeout=timeout or DEFAULT_ORT_TIMEOUT_S) as worker, \
            tempfile.TemporaryDirectory(prefix="bnfold-export-") as tmp:
        exported = Path(tmp) / "exported.onnx"
        with stage("export"):
            try:
                runnable = model if isinstance(model, nn.Module) else subject.runnable  # a program: its module
                export_onnx(model, inputs, run_model(runnable, inputs), exported, exporter, opset=opset,
                            dynamic_batch=dynamic)
            except BnfoldError:
                raise
            except Exception as exc:  # the exporters raise anything: one line, and what to try instead
                other = "torchscript" if exporter == "dynamo" else "dynamo"
                raise ExportError(f"the {exporter} exporter failed: {type(exc).__name__}: {first_line(exc, 300)}",
                                  f"try --exporter {other}, or --debug for the exporter's own output") from None
        with stage("graph fold"):
            graph = load_onnx(exported)
            written = next((o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")), None)
            if opset is not None and written != opset:  # an exporter that quietly wrote another opset
                raise ExportError(f"asked for opset {opset}, the {exporter} exporter wrote opset {written}",
                                  "choose an opset the exporter supports, or omit --opset")
            if fold:
                folded = fold_graph(graph)
                graph, result.graph_folded, result.graph_affine = folded.model, list(folded.folded), list(folded.affine)
                result.notes += folded.notes
            plan = discover_graph(graph)
            result.left = list(plan.skips) + [Skip(f.bn.name, f"foldable ({f.describe()}): left by --no-fold",
                                                   "not-requested")
                                              for f in plan.folds] + _unpaired_bns(graph, plan)
        candidate = Path(tmp) / "candidate" / output.name
        candidate.parent.mkdir()
        with stage("check"):
            save_onnx(graph, candidate, external_data=external_data)
            try:
                onnx.checker.check_model(str(candidate), full_check=True)
            except Exception as exc:  # noqa: BLE001 - the checker raises several types; all mean "invalid graph"
                result.stopped = "onnx checker"
                result.notes.append(f"onnx.checker: {first_line(exc, 300)}")
                return
        cases = {c.label: (_cast_inputs(c.inputs, half_inputs), c.expected) for c in reference.cases}
        with stage("onnxruntime"):
            checked = check_onnx(None, cases, onnx_path=candidate, exporter=exporter, atol=atol, rtol=rtol,
                                 worker=worker)
        result.findings += [f for f in checked.findings if f.code != "BN011"]  # left BNs are listed with reasons
        result.parity += checked.parity
        if checked.error or any(f.severity == "error" for f in checked.findings) or not checked.parity:
            result.stopped = "onnx parity"
            return
        with stage("write"):
            result.files = [str(f) for f in save_onnx(graph, output, external_data=external_data)]
        result.output = output


def _cast_inputs(inputs: tuple[torch.Tensor, ...], half: bool) -> tuple[torch.Tensor, ...]:
    return tuple(t.half() if half and t.is_floating_point() else t for t in inputs)


def _unpaired_bns(graph: onnx.ModelProto, found: Any) -> list[Skip]:
    """BatchNormalization nodes the plan neither folds nor explains (there should be none: a safety net).

    Nodes are named as the plan names them (:func:`bnfold.onnx.graph.node_labels`: ``bn@3`` when two share "bn").
    """
    named = {s.bn for s in found.skips} | {f.bn.name for f in found.folds}
    return [Skip(label, "left in the graph") for label, node in zip(node_labels(graph.graph.node), graph.graph.node)
            if node.op_type == "BatchNormalization" and label not in named]
