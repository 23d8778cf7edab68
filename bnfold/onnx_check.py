"""ONNX: export from the eval model, lint the graph, run onnxruntime in a child process, compare.

The default exporter is the TorchScript one (``dynamo=False``): it takes a fraction of a second where the
torch.export-based exporter takes seconds even for a tiny model, which matters for a CI gate run on every
commit. ``exporter="dynamo"`` selects the other (it needs onnxscript). Either way the model is exported
from its eval copy: the torch.export-based exporter bakes the current mode into the graph.
"""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from bnfold.compare import Comparison, compare_output, flatten_outputs
from bnfold.errors import first_line
from bnfold.findings import Finding

EXPORTERS = ("torchscript", "dynamo")
_PRODUCERS = {"Conv", "ConvTranspose", "Gemm"}
ORT_TIMEOUT_S = 600
_WORKER = Path(__file__).with_name("ort_worker.py")


def export_onnx(model: Any, inputs: tuple[torch.Tensor, ...], outputs: Any, path: Path,
                exporter: str = "torchscript") -> None:
    """Export ``model`` (already in eval mode) with a dynamic batch axis on every input and output.

    ``outputs`` is the model's output on ``inputs`` (the caller has it already; it names the ONNX outputs).
    A ``torch.export`` program is translated as it is (its own shapes, dynamic or not), by the dynamo exporter.
    """
    program = model if isinstance(model, torch.export.ExportedProgram) else None
    n_outputs = len(flatten_outputs(outputs))
    input_names = [f"input_{i}" for i in range(len(inputs))]
    output_names = [f"output_{i}" for i in range(n_outputs)]
    sink = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(sink):
        warnings.simplefilter("ignore")
        if program is not None:
            torch.onnx.export(program, inputs, str(path), dynamo=True, input_names=input_names,
                              output_names=output_names)
        elif exporter == "dynamo":
            batch = torch.export.Dim.AUTO if hasattr(torch.export.Dim, "AUTO") else torch.export.Dim("batch")
            torch.onnx.export(model, inputs, str(path), dynamo=True, input_names=input_names,
                              output_names=output_names, dynamic_shapes=tuple({0: batch} for _ in inputs))
        else:
            axes = {name: {0: "batch"} for name in input_names + output_names}
            torch.onnx.export(model, inputs, str(path), dynamo=False, input_names=input_names,
                              output_names=output_names, dynamic_axes=axes)


def _node_name(node: onnx.NodeProto, index: int) -> str:
    return node.name or f"{node.op_type}#{index}"


def _constants(graph: onnx.GraphProto) -> dict[str, onnx.TensorProto]:
    """Initializers and Constant outputs by name (their data is read only when needed, from ``base_dir``)."""
    tensors = {init.name: init for init in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            tensors[node.output[0]] = node.attribute[0].t
    return tensors


def lint(model: onnx.ModelProto, base_dir: Path | None = None) -> list[Finding]:
    """BN009 (training-mode BatchNormalization/Dropout) and BN011 (a foldable BatchNormalization left in).

    ``base_dir`` is where external tensor data lives (the model file's folder).
    """
    graph = model.graph
    constants = _constants(graph)
    producer = {out: node for node in graph.node for out in node.output}
    consumers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            consumers[name] = consumers.get(name, 0) + 1
    outputs = {o.name for o in graph.output}
    findings = []
    for index, node in enumerate(graph.node):
        name = _node_name(node, index)
        if node.op_type == "BatchNormalization":
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            if attrs.get("training_mode", 0) == 1 or len(node.output) > 1:
                findings.append(Finding("BN009", name, "BatchNormalization with training_mode=1: it normalises "
                                                       "with batch statistics at inference"))
                continue
            src = producer.get(node.input[0])
            if (src is not None and src.op_type in _PRODUCERS and consumers.get(node.input[0], 0) == 1
                    and node.input[0] not in outputs and all(i in constants for i in node.input[1:])):
                findings.append(Finding("BN011", name, f"follows {src.op_type} {src.name or '(unnamed)'} and could "
                                                       "be folded into its weights"))
        elif node.op_type == "Dropout" and len(node.input) > 2 and node.input[2]:
            tensor = constants.get(node.input[2])
            flag = None if tensor is None else numpy_helper.to_array(tensor, base_dir=str(base_dir or ""))
            if flag is None or bool(np.asarray(flag).item()):
                state = "true" if flag is not None else "a graph input (may be true)"
                findings.append(Finding("BN009", name, f"Dropout with training_mode {state}: random at inference"))
    return findings


@dataclass
class OrtRun:
    """What the child process returned: per case, the outputs of two runs in one session."""

    # case -> [optimised run, as-written run, as-written run again] -> outputs
    outputs: dict[str, list[list[np.ndarray]]] = field(default_factory=dict)
    error: str | None = None


class OrtWorker:
    """A child process running onnxruntime; started early so its import overlaps with other work."""

    def __init__(self) -> None:
        self._stderr = tempfile.TemporaryFile(mode="w+")
        # Run the file, not the module: `-m bnfold.ort_worker` would import bnfold (and torch) first, 1.5 s.
        self.proc = subprocess.Popen([sys.executable, str(_WORKER), "--serve"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self._stderr, text=True)
        self.used = False

    def request(self, model: Path, inputs: Path, outputs: Path) -> str | None:
        """Run one request; returns None on success, else what went wrong (a crash included)."""
        self.used = True
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps({"model": str(model), "inputs": str(inputs),
                                                  "outputs": str(outputs)}) + "\n")
                self.proc.stdin.flush()
                answer = self._answer()
            except (BrokenPipeError, OSError):
                answer = ""
            if answer == "ok":
                return None
            if answer.startswith("error "):
                return f"onnxruntime failed: {answer[6:]}"
        code = self.proc.wait(timeout=ORT_TIMEOUT_S)
        self._stderr.seek(0)
        last = (self._stderr.read().strip().splitlines() or [""])[-1][:300]
        how = f"was killed by signal {-code}" if code < 0 else f"exited with {code}"
        return f"onnxruntime {how}: {last}".rstrip(": ")

    def _answer(self) -> str:
        while True:
            line = self.proc.stdout.readline()
            if not line:
                return ""  # the process died
            if line.strip() != "ready":
                return line.strip()

    def close(self) -> None:
        if not self.used:
            self.proc.kill()  # never asked for anything (the export failed): do not wait for its import
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout, self._stderr):
            if not stream.closed:
                stream.close()

    def __enter__(self) -> OrtWorker:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def run_onnxruntime(path: Path, cases: dict[str, tuple[torch.Tensor, ...]], workdir: Path,
                    worker: OrtWorker | None = None) -> OrtRun:
    model = onnx.load(str(path), load_external_data=False)
    initializers = {x.name for x in model.graph.initializer}
    input_names = [i.name for i in model.graph.input if i.name not in initializers]
    feeds = {}
    for case, tensors in cases.items():
        for name, tensor in zip(input_names, tensors):
            feeds[f"{case}/{name}"] = tensor.detach().cpu().numpy()
    inputs_path, outputs_path = workdir / "ort_inputs.npz", workdir / "ort_outputs.npz"
    np.savez(inputs_path, **feeds)
    with contextlib.ExitStack() as stack:
        worker = worker or stack.enter_context(OrtWorker())
        error = worker.request(path, inputs_path, outputs_path)
    if error:
        return OrtRun(error=error)
    arrays = np.load(outputs_path)
    outputs: dict[str, list[list[tuple[int, np.ndarray]]]] = {}
    for key in arrays.files:
        case, index, attempt = key.split("/")
        outputs.setdefault(case, [[], [], []])[int(attempt)].append((int(index), arrays[key]))
    return OrtRun({case: [[a for _, a in sorted(r, key=lambda t: t[0])] for r in runs]
                   for case, runs in outputs.items()})


def static_batch(path: Path) -> int | None:
    """The fixed batch size of the graph's first input, or None when it is symbolic."""
    model = onnx.load(str(path), load_external_data=False)
    initializers = {x.name for x in model.graph.initializer}
    for graph_input in model.graph.input:
        if graph_input.name in initializers:
            continue
        dims = graph_input.type.tensor_type.shape.dim
        if dims and dims[0].HasField("dim_value"):
            return int(dims[0].dim_value)
        return None
    return None


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
) -> OnnxResult:
    """Export (unless ``onnx_path`` is given), lint, run onnxruntime and compare with ``expected``.

    ``expected`` maps a case label ("batch 1", "batch 8") to ``(inputs, torch eval outputs)``.
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
                return OnnxResult([], [], timings, None, error=f"{exporter} export failed: {type(exc).__name__}: {first_line(exc, 300)}")
            finally:
                timings["export"] = time.perf_counter() - start
        start = time.perf_counter()
        findings = lint(onnx.load(str(onnx_path), load_external_data=False), onnx_path.parent)
        fixed = static_batch(onnx_path)
        cases = {label: value for label, value in expected.items()
                 if fixed is None or value[0][0].shape[0] == fixed}
        timings["lint"] = time.perf_counter() - start
        if not cases:
            findings.append(Finding("BN010", "", f"the ONNX graph takes batch {fixed} only, and no comparison input has "
                                                 "that batch size"))
            return OnnxResult(findings, [], timings, onnx_path)
        start = time.perf_counter()
        run = run_onnxruntime(onnx_path, {label: value[0] for label, value in cases.items()}, workdir, worker)
        timings["onnxruntime"] = time.perf_counter() - start
    if run.error:
        findings.append(Finding("BN010", "", run.error))
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
            figure = f"max abs {worst.max_abs:.3g}, max rel {worst.max_rel:.3g} at {worst.worst_index} in {worst.name}" if worst else ""
            findings.append(Finding("BN010", "", f"{label}: {figure}"))
        if any(a.shape != b.shape or not np.array_equal(a, b, equal_nan=True) for a, b in zip(written, again)):
            findings.append(Finding("BN007", "onnx", f"{label}: two runs of the same input in one onnxruntime session "
                                                     "differ (a stochastic op is active in the graph)"))
    timings["compare"] = time.perf_counter() - start
    return OnnxResult(findings, parity, timings, onnx_path)
