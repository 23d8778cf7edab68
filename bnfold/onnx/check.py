"""Check an ONNX graph against the PyTorch eval model: export (unless given), lint, run, compare."""

from __future__ import annotations

import contextlib
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from bnfold.compare import Comparison, compare_output, flatten_outputs
from bnfold.errors import first_line
from bnfold.findings import Finding
from bnfold.onnx.export import export_onnx
from bnfold.onnx.lint import lint
from bnfold.onnx.runner import OrtWorker, run_onnxruntime, static_batch


@dataclass
class OnnxResult:
    findings: list[Finding]
    parity: list[Comparison]
    timings: dict[str, float]
    path: Path | None = None
    error: str | None = None  # the export failed: nothing was checked


def check_onnx(
    model: Any,
    expected: dict[str, tuple[tuple[torch.Tensor, ...], Any]],
    *,
    onnx_path: Path | None,
    exporter: str,
    atol: float | None,
    rtol: float | None,
    workdir: Path | None = None,
    worker: OrtWorker | None = None,
    timeout: float | None = None,
) -> OnnxResult:
    """Export (unless ``onnx_path`` is given), lint, run onnxruntime and compare with ``expected``.

    ``expected`` maps a case label ("batch 1", "batch 8") to ``(inputs, torch eval outputs)``. ``timeout``:
    seconds onnxruntime may take (see ``run_onnxruntime``); past it, or when onnxruntime cannot load or run the
    graph or crashes, the result holds a BN010 finding with a hint for that case.
    """
    timings: dict[str, float] = {}
    with contextlib.ExitStack() as stack:
        workdir = workdir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bnfold-")))
        if onnx_path is None:
            start = time.perf_counter()
            onnx_path = workdir / "model.onnx"
            try:
                inputs, outputs = next(iter(expected.values()))
                export_onnx(model, inputs, outputs, onnx_path, exporter)
            except Exception as exc:  # the exporters raise anything; the user needs the first line
                error = f"{exporter} export failed: {type(exc).__name__}: {first_line(exc, 300)}"
                return OnnxResult([], [], timings, None, error=error)
            finally:
                timings["export"] = time.perf_counter() - start
        start = time.perf_counter()
        findings = lint(onnx.load(str(onnx_path), load_external_data=False), onnx_path.parent)
        fixed = static_batch(onnx_path)
        cases = {label: value for label, value in expected.items()
                 if fixed is None or value[0][0].shape[0] == fixed}
        timings["lint"] = time.perf_counter() - start
        if not cases:
            findings.append(Finding("BN010", "", f"the ONNX graph takes batch {fixed} only, and no comparison input "
                                                 "has that batch size"))
            return OnnxResult(findings, [], timings, onnx_path)
        start = time.perf_counter()
        run = run_onnxruntime(onnx_path, {label: value[0] for label, value in cases.items()}, workdir, worker,
                              timeout)
        timings["onnxruntime"] = time.perf_counter() - start
    if run.failure:
        findings.append(run.failure.finding())
        return OnnxResult(findings, [], timings, onnx_path)
    start = time.perf_counter()
    parity = []
    for label, (_, torch_out) in cases.items():
        reference = flatten_outputs(torch_out)
        first, written, again = run.outputs[label]
        comparison = Comparison(f"onnxruntime {label}", [compare_output(name, ref, got, atol, rtol)
                                                         for (name, ref), got in zip(reference.items(), first)])
        if len(first) != len(reference):
            findings.append(Finding("BN010", "", f"{label}: onnxruntime returned {len(first)} outputs, PyTorch "
                                                 f"{len(reference)}"))
        parity.append(comparison)
        if not comparison.ok:
            worst = comparison.worst()
            figure = worst.figure() if worst else "no output compared"
            findings.append(Finding("BN010", "", f"{label}: {figure}"))
        if any(a.shape != b.shape or not np.array_equal(a, b, equal_nan=True) for a, b in zip(written, again)):
            findings.append(Finding("BN007", "onnx", f"{label}: two runs of the same input in one onnxruntime session "
                                                     "differ (a stochastic op is active in the graph)"))
    timings["compare"] = time.perf_counter() - start
    return OnnxResult(findings, parity, timings, onnx_path)
