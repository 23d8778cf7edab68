"""``bnfold.verify``: catch train/inference-mode bugs and prove ONNX parity, as one pass/fail.

Stages (each timed): load -> audit (static checks of BN statistics, then behavioural probes) -> fold
(``bnfold.fuse`` parity, BN008) -> ONNX (export or a given file, lint, onnxruntime in a child process,
comparison with the PyTorch eval output). The model is evaluated as deployed: in eval mode. A model handed
over in training mode is reported (BN012), never compared against its train-mode output.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bnfold import audit
from bnfold.compare import Comparison
from bnfold.errors import BnfoldError, InputSpecError, first_line
from bnfold.findings import CODES, CODES_OF_CHECK, Finding
from bnfold.fuse import eval_mode, fuse, parity_inputs, reference_cases
from bnfold.inputs import SHAPE_HINT, InputSpec, specs_from_tensors
from bnfold.load import Loaded, has_static_batch, load
from bnfold.onnx_check import OrtWorker, check_onnx

CHECKS = ("audit", "fold", "onnx")


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
        return bool(self.checks) and not self.errors and all(c.passed for c in self.checks)

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
    trust_pickle: bool = False,
    name: str | None = None,
    data: Any = None,
    samples: int | None = 4096,
) -> Report:
    """Verify that ``model`` is deployable: eval-mode correctness, foldability and ONNX parity.

    ``model`` is an ``nn.Module`` or a path to any file ``bnfold fuse`` reads; an ``.onnx`` path gets the
    graph-only checks (lint, onnxruntime determinism). ``onnx`` names an existing ONNX file to compare with
    the torch model instead of exporting one. ``disable`` drops finding codes, like a linter's ignore list.
    ``data`` (batches, a callable returning them, or a ``--data`` spec string) adds the stale-statistics check
    (BN013): the running statistics are compared with population statistics of up to ``samples`` inputs.
    """
    unknown = [c for c in disable if c not in CODES]
    if unknown:
        raise InputSpecError(f"unknown finding code(s) to disable: {', '.join(unknown)}",
                             f"known codes: {', '.join(CODES)}")
    report = Report(model=name or (str(model) if not isinstance(model, nn.Module) else type(model).__name__),
                    disabled=tuple(disable))
    start = time.perf_counter()
    if isinstance(model, (str, os.PathLike)) and Path(model).suffix == ".onnx":
        return _verify_onnx_only(Path(model), example_inputs, report, seed)
    loaded = (load(model, arch=arch, arch_kwargs=arch_kwargs, trust_pickle=trust_pickle)
              if isinstance(model, (str, os.PathLike)) else Loaded(model, "module", Path(report.model)))
    report.timings["load"] = time.perf_counter() - start
    report.notes += loaded.notes
    specs = _specs(example_inputs, loaded)
    subject = loaded.model.module() if isinstance(loaded.model, torch.export.ExportedProgram) else loaded.model
    has_modes = not isinstance(loaded.model, torch.export.ExportedProgram)
    fixed_batch = not has_modes and has_static_batch(loaded.model)

    if has_modes and any(m.training for m in subject.modules()):
        report.findings.append(Finding("BN012", "", "handed over with model.training=True; verified after eval()"))
    # Start onnxruntime's process first: its slow import overlaps with the audit, the fold and the export.
    with OrtWorker() if "onnx" in checks else contextlib.nullcontext() as worker:
        if "audit" in checks:
            _audit(subject, specs, seed, report, has_modes, fixed_batch)
            if data is not None:
                _stale(subject, data, samples, report)
        if "fold" in checks:
            _fold(loaded.model, specs, seed, atol, rtol, report)
        if "onnx" in checks:
            if not has_modes:
                report.notes.append("a torch.export program is exported to ONNX as it is, by the dynamo exporter")
            _onnx(subject if has_modes else loaded.model, specs, seed, atol, rtol, exporter if has_modes else "dynamo",
                  Path(onnx) if onnx else None, report, has_modes, fixed_batch, worker)
    _apply_disable(report)
    report.timings["total"] = time.perf_counter() - start
    return report


def _apply_disable(report: Report) -> None:
    """Drop disabled codes; a check that failed only through them passes, and says so."""
    report.findings = [f for f in report.findings if f.code not in report.disabled]
    for check in report.checks:
        codes = CODES_OF_CHECK.get(check.name, ())
        silenced = [c for c in codes if c in report.disabled]
        if not check.passed and silenced and not any(f.code in codes for f in report.errors):
            check.passed = True
            check.detail += f" (disabled: {', '.join(silenced)})"


def _as_specs(example_inputs: Any) -> list[InputSpec]:
    """Input specs from tensors or specs (empty when none were given)."""
    if not example_inputs:
        return []
    if isinstance(example_inputs[0], InputSpec):
        return list(example_inputs)
    return specs_from_tensors(tuple(example_inputs))


def _specs(example_inputs: Any, loaded: Loaded) -> list[InputSpec]:
    if example_inputs:
        return _as_specs(example_inputs)
    if loaded.input_specs:
        return loaded.input_specs
    raise InputSpecError(f"{loaded.path} ({loaded.format}) does not say what input it takes", SHAPE_HINT)


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


def _stale(model: Any, data: Any, samples: int | None, report: Report) -> None:
    """BN013: running statistics far from the population statistics of ``data`` (see bnfold.recalibrate)."""
    from bnfold.data import load_data
    from bnfold.recalibrate import recalibrate

    with _Stage(report, "statistics vs data") as stage:
        if not isinstance(model, nn.Module) or isinstance(model, torch.jit.ScriptModule):
            report.notes.append("--data needs an eager model: the stale-statistics check did not run")
            return
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


def _fold(model: Any, specs: list[InputSpec], seed: int, atol, rtol, report: Report) -> None:
    with _Stage(report, "fold") as stage:
        try:
            result = fuse(model, specs, atol=atol, rtol=rtol, seed=seed)
        except BnfoldError:
            raise
        except Exception as exc:  # a model bnfold cannot fold is a finding, not a crash
            report.checks.append(Check("fold parity", False, f"folding failed: {type(exc).__name__}: {exc}"[:300],
                                       time.perf_counter() - stage.start))
            report.findings.append(Finding("BN008", "", f"folding raised {type(exc).__name__}"))
            return
        report.parity += result.parity
        worst = max((o for c in result.parity for o in c.outputs), key=lambda o: o.max_rel, default=None)
        figure = f"max rel {worst.max_rel:.3g}" if worst else "no outputs"
        report.checks.append(Check("fold parity", result.ok, f"{len(result.folded)} folded, {len(result.skipped)} "
                                   f"skipped; {figure}", time.perf_counter() - stage.start))
        if not result.ok and worst is not None:
            report.findings.append(Finding("BN008", worst.name, f"max abs {worst.max_abs:.3g}, max rel "
                                                                f"{worst.max_rel:.3g} at {worst.worst_index}"))


def _onnx(model: Any, specs: list[InputSpec], seed: int, atol, rtol, exporter: str, onnx_path: Path | None,
          report: Report, has_modes: bool, fixed_batch: bool, worker: OrtWorker | None) -> None:
    start = time.perf_counter()
    with eval_mode(model) if has_modes else contextlib.nullcontext(model) as reference:
        inputs = parity_inputs(specs, seed)
        runnable = reference if has_modes else reference.module()
        cases = reference_cases(runnable, inputs[-1:] if fixed_batch else inputs)
        result = check_onnx(reference, {c.label: (c.inputs, c.expected) for c in cases}, onnx_path=onnx_path,
                            exporter=exporter, atol=atol, rtol=rtol, worker=worker)
    for stage, seconds in result.timings.items():
        report.timings[stage if stage != "compare" else "onnx compare"] = seconds
    report.findings += result.findings
    report.parity += result.parity
    if result.error:
        report.checks.append(Check("onnx parity", False, result.error, time.perf_counter() - start))
        return
    errors = [f for f in result.findings if f.severity == "error"]
    worst = max((o for c in result.parity for o in c.outputs), key=lambda o: o.max_rel, default=None)
    detail = (f"{'exported with ' + exporter if onnx_path is None else str(onnx_path)}; "
              + (f"max rel {worst.max_rel:.3g} vs PyTorch" if worst else "no comparison"))
    report.checks.append(Check("onnx parity", not errors and bool(result.parity), detail, time.perf_counter() - start))


def _verify_onnx_only(path: Path, example_inputs: Any, report: Report, seed: int) -> Report:
    """An .onnx file on its own: lint it and run it twice in one onnxruntime session."""
    import tempfile

    import onnx as onnx_lib

    from bnfold.inputs import make_inputs
    from bnfold.onnx_check import lint, run_onnxruntime

    start = time.perf_counter()
    try:
        graph = onnx_lib.load(str(path), load_external_data=False)
        onnx_lib.checker.check_model(str(path))
    except Exception as exc:
        raise BnfoldError(f"{path}: not a valid ONNX model: {first_line(exc, 200)}") from None
    report.findings += lint(graph, path.parent)
    report.checks.append(Check("onnx lint", not any(f.severity == "error" for f in report.findings),
                               f"{len(graph.graph.node)} nodes", time.perf_counter() - start))
    specs = _as_specs(example_inputs) or _onnx_specs(graph)
    with tempfile.TemporaryDirectory(prefix="bnfold-") as tmp:
        run = run_onnxruntime(path, {"determinism": make_inputs(specs, seed)}, Path(tmp))
    if run.error:
        report.findings.append(Finding("BN010", "", run.error))
    else:
        _, written, again = run.outputs["determinism"]
        same = all(a.shape == b.shape and (a == b).all() for a, b in zip(written, again))
        if not same:
            report.findings.append(Finding("BN007", "onnx", "two runs of the same input in one session differ"))
        report.checks.append(Check("onnx determinism", same, "same input twice in one onnxruntime session"))
    _apply_disable(report)
    report.timings["total"] = time.perf_counter() - start
    return report


def _onnx_specs(graph: Any) -> list[InputSpec]:
    """Input specs from the graph's declared shapes (a symbolic dimension becomes 1)."""
    from onnx import helper

    initializers = {x.name for x in graph.graph.initializer}
    specs = []
    for graph_input in graph.graph.input:
        if graph_input.name in initializers:
            continue
        dims = [d.dim_value if d.HasField("dim_value") else 1 for d in graph_input.type.tensor_type.shape.dim]
        if not dims:
            raise InputSpecError(f"ONNX input {graph_input.name!r} has no shape", SHAPE_HINT)
        dtype = helper.tensor_dtype_to_np_dtype(graph_input.type.tensor_type.elem_type)
        specs.append(InputSpec(tuple(dims), getattr(torch, str(dtype))))
    return specs
