"""``bnfold.verify``: catch train/inference-mode bugs and prove ONNX parity, as one pass/fail.

Stages (each timed): load -> audit (static checks of BN statistics, then behavioural probes) -> fold
(``bnfold.fuse`` parity, BN008) -> ONNX (export or a given file, lint, onnxruntime in a child process,
comparison with the PyTorch eval output). The model is evaluated as deployed: in eval mode. A model handed
over in training mode is reported (BN012), never compared against its train-mode output.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx as onnx_proto
import torch
from torch import nn

from bnfold import audit
from bnfold.compare import Comparison
from bnfold.data import load_data
from bnfold.errors import BnfoldError, InputSpecError, LoadError, first_line
from bnfold.findings import CAUSES, CHECK_GROUPS, CODES, CODES_OF_CHECK, Finding
from bnfold.fuse import fuse
from bnfold.inputs import InputSpec, make_inputs
from bnfold.kinds import Adapter, adapter_for
from bnfold.load import Loaded, importable, load
from bnfold.onnx.check import check_onnx
from bnfold.onnx.culprit import find_divergence
from bnfold.onnx.graph import GraphIndex, graph_inputs
from bnfold.onnx.io import load_onnx
from bnfold.onnx.lint import lint
from bnfold.onnx.runner import DEFAULT_ORT_TIMEOUT_S, OrtWorker, check_timeout, run_onnxruntime
from bnfold.recalibrate import recalibrate
from bnfold.runtime import Reference, make_reference, split_examples
from bnfold.sniff import sniff

CHECKS = CHECK_GROUPS


@dataclass
class Check:
    """One check of one model: PASSED/FAILED with its figures."""

    name: str
    passed: bool
    detail: str
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "passed": self.passed, "detail": self.detail, "seconds": self.seconds}


@dataclass
class Report:
    """The result of verifying one model. Truthy when it ran checks and no error finding remains."""

    model: str
    findings: list[Finding] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)
    parity: list[Comparison] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    disabled: tuple[str, ...] = ()

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "error"]

    @property
    def ok(self) -> bool:
        ran = any(c.name != "handover" for c in self.checks)  # a run that checked nothing fails
        return ran and not self.errors and all(c.passed for c in self.checks)

    def __bool__(self) -> bool:
        return self.ok

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "ok": self.ok,
            "findings": [f.to_dict() for f in self.findings],
            "checks": [c.to_dict() for c in self.checks],
            "parity": [c.to_dict() for c in self.parity],
            "timings": dict(self.timings),
            "notes": list(self.notes),
            "disabled": list(self.disabled),
        }


def verify(
    model: nn.Module | str | os.PathLike[str],
    example_inputs: tuple[torch.Tensor, ...] | list[InputSpec] | None = None,
    *,
    onnx: str | os.PathLike[str] | None = None,
    exporter: str = "torchscript",
    checks: tuple[str, ...] = CHECKS,
    disable: tuple[str, ...] = (),
    atol: float | None = None,
    rtol: float | None = None,
    seed: int = 0,
    arch: str | None = None,
    arch_kwargs: str | None = None,
    trust: bool = False,
    trust_pickle: bool = False,
    name: str | None = None,
    data: Any = None,
    samples: int | None = 4096,
    timeout: float | None = None,
    code_root: str | os.PathLike[str] | None = None,
) -> Report:
    """Verify that ``model`` is deployable: eval-mode correctness, foldability and ONNX parity.

    ``model`` is an ``nn.Module`` or a path to any file ``bnfold fuse`` reads; an ``.onnx`` path gets the
    graph-only checks (lint, onnxruntime determinism). ``onnx`` names an existing ONNX file to compare with
    the torch model instead of exporting one. ``disable`` drops finding codes, like a linter's ignore list.
    ``data`` (batches, a callable returning them, or a ``--data`` spec string) adds the stale-statistics check
    (BN013): the running statistics are compared with population statistics of up to ``samples`` inputs.
    ``trust`` (``trust_pickle`` is its old name) allows files that run code (see :mod:`bnfold.trust`).
    ``timeout`` bounds each onnxruntime call (seconds). ``code_root`` is the folder ``arch`` is imported from
    (the current folder when None).
    """
    trust = trust or trust_pickle
    timeout = check_timeout(DEFAULT_ORT_TIMEOUT_S if timeout is None else timeout)
    unknown = [c for c in disable if c not in CODES]
    if unknown:
        raise InputSpecError(f"unknown finding code(s) to disable: {', '.join(unknown)}",
                             f"known codes: {', '.join(CODES)}")
    report = Report(model=name or (str(model) if not isinstance(model, nn.Module) else type(model).__name__),
                    disabled=tuple(disable))
    start = time.perf_counter()
    if isinstance(model, (str, os.PathLike)) and _is_onnx(Path(model)):
        return _verify_onnx_only(Path(model), example_inputs, report, seed, timeout)
    if onnx is not None and not Path(onnx).is_file():
        raise LoadError(f"--onnx {onnx}: no such file", "pass the path of an existing .onnx file, or omit --onnx to "
                        "export one")
    if onnx is not None:
        load_onnx(onnx)  # a file bnfold cannot read safely (not ONNX, data outside its folder) stops here
    loaded = (load(model, arch=arch, arch_kwargs=arch_kwargs, trust=trust, code_root=code_root)
              if isinstance(model, (str, os.PathLike)) else Loaded(model, "module", Path(report.model)))
    report.timings["load"] = time.perf_counter() - start
    report.notes += loaded.notes
    adapter = adapter_for(loaded.model)
    adapter.require("verify")
    given, specs = split_examples(example_inputs)
    specs = adapter.specs(specs, f"{loaded.path} ({loaded.format}) does not say what input it takes")
    handed_in_training = adapter.was_training()
    if handed_in_training:
        report.findings.append(Finding("BN012", "", "handed over with model.training=True; verified after eval()"))
    if checks:  # a run that checks nothing must not pass on the handover alone
        report.checks.append(Check("handover", True, "handed over in training mode; verified after eval()"
                                   if handed_in_training else "handed over in eval mode" if adapter.has_modes
                                   else "a torch.export program: its mode is part of its graph"))
    # Start onnxruntime's process first: its slow import overlaps with the audit, the fold and the export.
    with OrtWorker(timeout=timeout) if "onnx" in checks else contextlib.nullcontext() as worker:
        subject = adapter.subject
        if "audit" in checks and subject is not None:
            _audit(subject, specs, seed, report, adapter.has_modes, adapter.fixed_batch)
            if data is not None:
                _stale(subject, data, samples, report, code_root)
        if "fold" in checks or "onnx" in checks:
            with adapter.evaluating() as runnable:  # the eval model's outputs, computed once for both stages
                reference = make_reference(runnable, specs, seed, given, adapter.fixed_batch)
        if "fold" in checks:
            _fold(adapter, reference, atol, rtol, report)
        if "onnx" in checks:
            if not adapter.has_modes:
                report.notes.append("a torch.export program is exported to ONNX as it is, by the dynamo exporter")
            exporter = exporter if adapter.has_modes else "dynamo"
            with adapter.evaluating() as runnable:
                _onnx(runnable if adapter.has_modes else adapter.model, reference, atol, rtol, exporter,
                      Path(onnx) if onnx else None, report, worker)
    _finish(report)
    report.timings["total"] = time.perf_counter() - start
    return report


def _is_onnx(path: Path) -> bool:
    """An ONNX file by its suffix, or by its content when the suffix says nothing (a protobuf, not a zip/pickle)."""
    if path.suffix.lower() == ".onnx":
        return True
    return path.is_file() and sniff(path) == "onnx"


def _finish(report: Report) -> None:
    """Every finding belongs to a check of the report; disabled codes are dropped, and a check that failed
    only through them passes and says so."""
    report.findings = [f for f in report.findings if f.code not in report.disabled]
    names = {c.name for c in report.checks}
    for finding in report.findings:
        if finding.check_name not in names:  # a finding filed outside a check's own stage still gets its case
            names.add(finding.check_name)
            report.checks.append(Check(finding.check_name, True, "see the findings"))
    for check in report.checks:
        own_errors = [f for f in report.errors if f.check_name == check.name]
        if own_errors:
            check.passed = False
            continue
        silenced = [c for c in CODES_OF_CHECK.get(check.name, ()) if c in report.disabled]
        if not check.passed and silenced:
            check.passed = True
            check.detail += f" (disabled: {', '.join(silenced)})"


class _Stage:
    """Times a block into ``report.timings[stage]``; ``.start`` is when it began."""

    def __init__(self, report: Report, stage: str) -> None:
        self.report, self.stage = report, stage

    def __enter__(self) -> _Stage:
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc: Any) -> None:
        timings = self.report.timings
        timings[self.stage] = timings.get(self.stage, 0.0) + time.perf_counter() - self.start


def _audit(model: Any, specs: list[InputSpec], seed: int, report: Report, has_modes: bool,
           fixed_batch: bool) -> None:
    with _Stage(report, "audit") as stage:
        static = audit.static_findings(model) if isinstance(model, nn.Module) else []
        report.findings += static
        report.checks.append(Check("statistics", not any(f.severity == "error" for f in static),
                                   f"{len(static)} finding(s) in BN statistics" if static else "BN statistics sound",
                                   time.perf_counter() - stage.start))
        probe_start = time.perf_counter()
        findings, probes = audit.probe(model, specs, seed, has_modes=has_modes, fixed_batch=fixed_batch)
        report.findings += findings
        seconds = (time.perf_counter() - probe_start) / max(len(probes), 1)
        report.checks += [Check(p.name, p.passed, p.detail, seconds) for p in probes]


STALE_MEAN_SHIFT = 0.5  # standard deviations of the data
STALE_VAR_RATIO = 2.0


def _stale(model: Any, data: Any, samples: int | None, report: Report,
           code_root: str | os.PathLike[str] | None = None) -> None:
    """BN013: running statistics far from the population statistics of ``data`` (see bnfold.recalibrate)."""
    with _Stage(report, "statistics vs data") as stage:
        if not isinstance(model, nn.Module) or isinstance(model, torch.jit.ScriptModule):
            report.notes.append("--data needs an eager model: the stale-statistics check did not run")
            return
        if isinstance(data, str) and code_root is not None:
            importable(Path(code_root))  # data = "module:function" from a config resolves against its folder
        batches = load_data(data) if isinstance(data, str) else data
        result = recalibrate(model, batches, samples=samples)
        stale = sorted((d for d in result.layers if d.mean_shift > STALE_MEAN_SHIFT or d.var_ratio > STALE_VAR_RATIO),
                       key=lambda d: d.score, reverse=True)
        for d in stale[:3]:
            report.findings.append(Finding("BN013", d.name, f"running mean off by {d.mean_shift:.3g} std, variance "
                                                            f"off by x{d.var_ratio:.3g} on {result.samples} inputs"))
        if len(stale) > 3:
            report.notes.append(f"BN013: {len(stale) - 3} more stale layer(s) beyond the 3 furthest")
        report.checks.append(Check("statistics vs data", True, f"{len(stale)} of {len(result.layers)} BN(s) stale; "
                                   f"recalibrating moves outputs by {result.output_change:.3g}",
                                   time.perf_counter() - stage.start))


def _fold(adapter: Adapter, reference: Reference, atol, rtol, report: Report) -> None:
    with _Stage(report, "fold") as stage:
        try:
            result = fuse(adapter, reference.specs, atol=atol, rtol=rtol, seed=reference.seed, reference=reference)
        except BnfoldError:
            raise
        except Exception as exc:  # a model bnfold cannot fold is a finding, not a crash
            report.checks.append(Check("fold parity", False, f"folding failed: {type(exc).__name__}: {exc}"[:300],
                                       time.perf_counter() - stage.start))
            report.findings.append(Finding("BN008", "", f"folding raised {type(exc).__name__}"))
            return
        report.parity += result.parity
        worst = _worst(result.parity)
        figure = worst.figure() if worst else "no outputs"
        report.checks.append(Check("fold parity", result.ok, f"{len(result.folded)} folded, {len(result.skipped)} "
                                   f"skipped; {figure}", time.perf_counter() - stage.start))
        if not result.ok and worst is not None:
            report.findings.append(Finding("BN008", worst.name, worst.figure()))


def _onnx(model: Any, reference: Reference, atol, rtol, exporter: str, onnx_path: Path | None, report: Report,
          worker: OrtWorker | None) -> None:
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bnfold-") as workdir:  # the graph stays there for the diagnosis
        result = check_onnx(model, {c.label: (c.inputs, c.expected) for c in reference.cases}, onnx_path=onnx_path,
                            exporter=exporter, atol=atol, rtol=rtol, worker=worker, workdir=Path(workdir))
        culprit = _culprit(model, result, reference, atol, rtol)
        ops = _node_ops(result.path)
    for stage, seconds in result.timings.items():
        report.timings[stage if stage != "compare" else "onnx compare"] = seconds
    findings = _linked([_onnx_filed(f) for f in result.findings] + culprit, report.findings, ops)
    report.findings += findings
    report.parity += result.parity
    seconds = time.perf_counter() - start
    if result.error:
        report.checks.append(Check("onnx parity", False, result.error, seconds))
        return
    source = f"exported with {exporter}" if onnx_path is None else str(onnx_path)
    _onnx_checks(report, findings, source, bool(result.parity), seconds)


def _culprit(model: Any, result: Any, reference: Reference, atol, rtol) -> list[Finding]:
    """When onnxruntime and PyTorch disagree, the first ONNX node and torch module where they part (BN010)."""
    failing = next((c for c in result.parity if not c.ok), None)
    if failing is None or result.path is None or not isinstance(model, nn.Module):
        return []
    case = next(c for c in reference.cases if failing.label.endswith(c.label))
    try:
        divergence = find_divergence(result.path, model, case.inputs, atol=atol, rtol=rtol)
    except BnfoldError as exc:  # the diagnosis is a bonus: the BN010 finding stands without it
        return [Finding("BN010", "", f"no culprit named: {exc.message}")]
    if divergence is None:
        return []
    return [Finding("BN010", divergence.module or divergence.onnx_node, divergence.message())]


def _node_ops(path: Path | None) -> dict[str, str]:
    """The op type of each node of the graph at ``path``, by the label findings name it with."""
    if path is None or not path.is_file():
        return {}
    index = GraphIndex.of(onnx_proto.load(str(path), load_external_data=False).graph)
    return {label: node.op_type for label, node in zip(index.labels, index.nodes)}


def _linked(findings: list[Finding], earlier: list[Finding], ops: dict[str, str]) -> list[Finding]:
    """Each ONNX finding that an error of the eval model explains (:data:`bnfold.findings.CAUSES`), linked to it."""
    linked = []
    for finding in findings:
        key = (finding.check_name, ops.get(finding.module) if finding.check_name == "onnx lint" else None)
        causes = CAUSES.get(key, ()) if finding.severity == "error" else ()
        cause = next((c for check in causes for c in earlier if c.check_name == check and c.severity == "error"),
                     None)
        linked.append(finding.because_of(cause) if cause is not None else finding)
    return linked


def _worst(comparisons: list[Comparison]) -> Any:
    """The output furthest from passing over several comparisons (NaN and shape mismatches first)."""
    worst = [w for w in (c.worst() for c in comparisons) if w is not None]
    return max(worst, key=lambda o: (not o.passed, o.required_rtol, o.max_rel), default=None)


def _onnx_filed(finding: Finding) -> Finding:
    """onnxruntime's own nondeterminism is the "onnx determinism" check, not PyTorch's."""
    return dataclasses.replace(finding, check="onnx determinism") if finding.code == "BN007" else finding


def _onnx_checks(report: Report, findings: list[Finding], source: str, compared: bool, seconds: float) -> None:
    """The three ONNX checks, each passing unless one of its own codes was filed as an error."""
    def failed(check: str) -> bool:
        return any(f.check_name == check and f.severity == "error" for f in findings)

    worst = _worst([c for c in report.parity if c.label.startswith("onnxruntime")])
    report.checks.append(Check("onnx lint", not failed("onnx lint"), f"{source}; {_lint_detail(findings)}"))
    report.checks.append(Check("onnx parity", compared and not failed("onnx parity"), (
        f"{worst.figure()} vs PyTorch" if worst else "onnxruntime compared nothing"), seconds))
    report.checks.append(Check("onnx determinism", not failed("onnx determinism"),
                               "the same input twice in one onnxruntime session"))


def _lint_detail(findings: list[Finding]) -> str:
    """The lint check's line: the codes it filed, or that it filed none."""
    codes = sorted({f.code for f in findings if f.check_name == "onnx lint"})
    return ", ".join(codes) + " found" if codes else "no training-mode or foldable BatchNormalization"


def _verify_onnx_only(path: Path, example_inputs: Any, report: Report, seed: int, timeout: float) -> Report:
    """An .onnx file on its own: lint it and run it twice in one onnxruntime session (through the ONNX adapter:
    the same loader, input specs and pairing rules as ``bnfold fuse model.onnx``)."""
    import onnx as onnx_lib

    start = time.perf_counter()
    graph = load(path).model  # external data from the model's own folder only
    try:
        onnx_lib.checker.check_model(str(path))
    except Exception as exc:  # noqa: BLE001 - the checker raises several types; all mean "invalid graph"
        raise LoadError(f"{path}: not a valid ONNX model: {first_line(exc, 200)}",
                        "check that the file is complete (not truncated) and was written by an ONNX exporter") from None
    findings = lint(graph, path.parent)
    report.checks.append(Check("onnx lint", True, f"{len(graph.graph.node)} nodes; {_lint_detail(findings)}",
                               time.perf_counter() - start))
    if not graph_inputs(graph.graph):
        raise InputSpecError(f"{path}: the graph takes no inputs: its outputs are constants, nothing to verify")
    specs = split_examples(example_inputs)[1] or adapter_for(graph).input_specs()
    with tempfile.TemporaryDirectory(prefix="bnfold-") as tmp:
        run = run_onnxruntime(path, {"determinism": make_inputs(specs, seed)}, Path(tmp), timeout=timeout)
    if run.failure:
        findings.append(run.failure.finding())
        report.checks.append(Check("onnx parity", False, run.error))
    else:
        _, written, again = run.outputs["determinism"]
        same = all(a.shape == b.shape and np.array_equal(a, b, equal_nan=True) for a, b in zip(written, again))
        finite = all(np.isfinite(a).all() for a in written if np.issubdtype(a.dtype, np.floating))
        if not same:
            findings.append(Finding("BN007", "onnx", "two runs of the same input in one session differ",
                                    check="onnx determinism"))
        report.checks.append(Check("onnx determinism", same, "same input twice in one onnxruntime session"))
        if not finite:
            findings.append(Finding("BN014", "onnx", "onnxruntime's outputs hold NaN/Inf on finite inputs"))
            report.checks.append(Check("finite outputs", False, "onnxruntime's outputs hold NaN/Inf"))
    report.findings += findings
    _finish(report)
    report.timings["total"] = time.perf_counter() - start
    return report
