"""ONNX: export from the eval model, lint the graph, run onnxruntime in a child process, compare.

The default exporter is the TorchScript one (``dynamo=False``): it takes a fraction of a second where the
torch.export-based exporter takes seconds even for a tiny model, which matters for a CI gate run on every
commit. ``exporter="dynamo"`` selects the other (it needs onnxscript). Either way the model is exported
from its eval copy: the torch.export-based exporter bakes the current mode into the graph.

onnxruntime runs in a child process (``bnfold/ort_worker.py``) under a per-request timeout, so that neither a
crash nor a graph that loops for hours takes the caller down with it. What goes wrong there is one of four
kinds (``OrtFailure.kind``), each a BN010 finding with its own hint: the graph does not load, it loads but
does not run, it runs past the timeout, or the process crashes.
"""

from __future__ import annotations

import contextlib
import ctypes
import io
import json
import logging
import math
import os
import queue
import subprocess
import sys
import tempfile
import threading
import time
import warnings
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from bnfold.compare import Comparison, compare_output, flatten_outputs
from bnfold.errors import BnfoldError, first_line
from bnfold.findings import Finding
from bnfold.ort_worker import LOAD, RUN

EXPORTERS = ("torchscript", "dynamo")
_PRODUCERS = {"Conv", "ConvTranspose", "Gemm"}
_WORKER = Path(__file__).with_name("ort_worker.py")
_log = logging.getLogger(__name__)

#: Seconds one onnxruntime request (two sessions created, every comparison input run three times) may take.
#: A ResNet-50-sized graph at batch 8 needs well under a minute on a CI runner's CPU; 300 s leaves ample room
#: for slower runners and larger graphs, yet stops a graph that never finishes long before a typical CI job
#: timeout would kill the whole run without a report. ``--timeout SECONDS`` changes it.
DEFAULT_ORT_TIMEOUT_S = 300.0
#: Seconds to wait for a child that was killed, or that closed its pipe, to be reaped: it is already dying.
_REAP_S = 5.0
#: Lines of the exporter's own printout kept on its exception (the IR graph it dumps runs to hundreds).
EXPORT_OUTPUT_TAIL = 20


# -- export -------------------------------------------------------------------------------------------------
@dataclass
class CapturedOutput:
    """What was printed while captured; ``text`` is filled in when the capture ends."""

    text: str = ""

    def tail(self, lines: int = EXPORT_OUTPUT_TAIL) -> str:
        return "\n".join(self.text.strip().splitlines()[-lines:])


def _flush_all() -> None:
    """Flush Python's and C's stdio buffers, so that text written before a file-descriptor switch goes where it
    was meant to (C++ code writes through C stdio, which buffers fully when stdout is not a terminal)."""
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        with contextlib.suppress(Exception):  # a replaced or closed stream has nothing to flush
            stream.flush()
    with contextlib.suppress(Exception):  # no C library to ask (Windows): Python's own flushes are all there is
        ctypes.CDLL(None).fflush(None)


@contextlib.contextmanager
def captured_output() -> Iterator[CapturedOutput]:
    """Send everything printed to stdout and stderr, by Python or by C/C++ code, to a temporary file.

    ``contextlib.redirect_stdout`` only swaps ``sys.stdout``; the TorchScript exporter prints its whole IR graph
    from C++ straight to file descriptor 1 when it fails, so the descriptors themselves are redirected (and
    restored, whatever happens). The switch is process-wide: other threads' output is captured meanwhile too.
    """
    captured = CapturedOutput()
    python_text = io.StringIO()
    _flush_all()
    with tempfile.TemporaryFile() as sink:
        saved = {}
        for fd in (1, 2):
            with contextlib.suppress(OSError):  # a closed descriptor (a daemon's) has nothing to protect
                saved[fd] = os.dup(fd)
        try:
            for fd in saved:
                os.dup2(sink.fileno(), fd)
            with contextlib.redirect_stdout(python_text), contextlib.redirect_stderr(python_text):
                yield captured
        finally:
            _flush_all()
            for fd, copy in saved.items():
                os.dup2(copy, fd)
                os.close(copy)
            sink.seek(0)
            captured.text = python_text.getvalue() + sink.read().decode(errors="replace")


def export_onnx(model: Any, inputs: tuple[torch.Tensor, ...], outputs: Any, path: Path,
                exporter: str = "torchscript") -> None:
    """Export ``model`` (already in eval mode) with a dynamic batch axis on every input and output.

    ``outputs`` is the model's output on ``inputs`` (the caller has it already; it names the ONNX outputs).
    A ``torch.export`` program is translated as it is (its own shapes, dynamic or not), by the dynamo exporter.
    Nothing the exporters print reaches the terminal: it is logged at debug level, and on failure its last
    lines are added to the exception as a note.
    """
    output = CapturedOutput()
    try:
        with captured_output() as output, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _export(model, inputs, len(flatten_outputs(outputs)), path, exporter)
    except Exception as exc:
        if hasattr(exc, "add_note") and output.text.strip():  # Python 3.11+
            exc.add_note(f"the exporter printed (last {EXPORT_OUTPUT_TAIL} lines):\n{output.tail()}")
        raise
    finally:
        if output.text.strip():
            _log.debug("%s exporter output:\n%s", exporter, output.text)


def _export(model: Any, inputs: tuple[torch.Tensor, ...], n_outputs: int, path: Path, exporter: str) -> None:
    input_names = [f"input_{i}" for i in range(len(inputs))]
    output_names = [f"output_{i}" for i in range(n_outputs)]
    if isinstance(model, torch.export.ExportedProgram):
        torch.onnx.export(model, inputs, str(path), dynamo=True, input_names=input_names,
                          output_names=output_names)
    elif exporter == "dynamo":
        batch = torch.export.Dim.AUTO if hasattr(torch.export.Dim, "AUTO") else torch.export.Dim("batch")
        torch.onnx.export(model, inputs, str(path), dynamo=True, input_names=input_names,
                          output_names=output_names, dynamic_shapes=tuple({0: batch} for _ in inputs))
    else:
        axes = {name: {0: "batch"} for name in input_names + output_names}
        torch.onnx.export(model, inputs, str(path), dynamo=False, input_names=input_names,
                          output_names=output_names, dynamic_axes=axes)


# -- lint ---------------------------------------------------------------------------------------------------
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


# -- onnxruntime in a child process -------------------------------------------------------------------------
TIMEOUT, CRASH = "timeout", "crash"
_ADVICE = {
    LOAD: "onnxruntime could not load the graph, so bnfold compared nothing: check the graph's opset and any "
          "custom-op domains against the installed onnxruntime; onnx.checker.check_model(path, full_check=True) "
          "names the node",
    RUN: "onnxruntime loaded the graph but could not run it, so bnfold compared nothing: check the input shapes "
         "and dtypes (--input-shape) against the graph's inputs and dynamic axes",
    TIMEOUT: f"raise the limit with --timeout SECONDS (default {DEFAULT_ORT_TIMEOUT_S:g}) if the model is only "
             "slow; a Loop or Scan with a huge trip count may never finish",
    CRASH: "onnxruntime crashed in its child process, so bnfold compared nothing: run the graph in onnxruntime "
           "directly to see why; malformed training-mode nodes are a common cause (re-export from the eval model)",
}


@dataclass(frozen=True)
class OrtFailure:
    """Why onnxruntime gave no outputs. ``kind``: "load", "run", "timeout" or "crash"; each has its own hint."""

    kind: str
    message: str

    @property
    def advice(self) -> str:
        return _ADVICE[self.kind]

    def finding(self) -> Finding:
        return Finding("BN010", "", self.message, advice=self.advice)


@dataclass
class OrtRun:
    """What the child process returned: per case, the outputs of two runs in one session."""

    # case -> [optimised run, as-written run, as-written run again] -> outputs
    outputs: dict[str, list[list[np.ndarray]]] = field(default_factory=dict)
    failure: OrtFailure | None = None

    @property
    def error(self) -> str | None:
        return self.failure.message if self.failure else None

    @property
    def advice(self) -> str | None:
        return self.failure.advice if self.failure else None


def check_timeout(seconds: float) -> float:
    """``seconds`` as a float, or BnfoldError when it is not a positive, finite number."""
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not 0 < seconds < math.inf:
        raise BnfoldError(f"the onnxruntime timeout must be a positive number of seconds, got {seconds!r}",
                          f"pass --timeout SECONDS, e.g. --timeout {DEFAULT_ORT_TIMEOUT_S * 2:g}")
    return float(seconds)


_EOF = None  # what the reader thread queues when the child closes its stdout


def _read_lines(stream: TextIO, lines: queue.Queue[str | None]) -> None:
    """Queue every line the child prints, then _EOF. A thread, so that the parent can wait with a deadline."""
    with stream:
        for line in stream:
            lines.put(line.strip())
    lines.put(_EOF)


def _stop(proc: subprocess.Popen, stderr: TextIO) -> None:
    """Kill and reap the child, then close the parent's ends of its pipes. Bounded: never hangs."""
    if proc.poll() is None:
        proc.kill()
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=_REAP_S)
    for stream in (proc.stdin, stderr):
        with contextlib.suppress(OSError):  # stdin may hold an unsent request to a dead child
            stream.close()


class OrtWorker:
    """A child process running onnxruntime; started early so its import overlaps with other work.

    ``timeout``: seconds each request may take, from sending it to the answer (including the rest of
    onnxruntime's import if the child is still starting). A request that runs past it gets its child killed
    and an OrtFailure of kind "timeout"; the next request starts a fresh child. The child is killed and reaped
    by ``close()``, when the parent is interrupted mid-request (KeyboardInterrupt included), when this object
    is collected, and at interpreter exit, whichever comes first.
    """

    def __init__(self, timeout: float = DEFAULT_ORT_TIMEOUT_S) -> None:
        self.timeout = check_timeout(timeout)
        self._start()

    def _start(self) -> None:
        self._stderr = tempfile.TemporaryFile(mode="w+")
        # Run the file, not the module: `-m bnfold.ort_worker` would import bnfold (and torch) first, 1.5 s.
        self.proc = subprocess.Popen([sys.executable, str(_WORKER), "--serve"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self._stderr, text=True)
        self._lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=_read_lines, args=(self.proc.stdout, self._lines), daemon=True,
                         name=f"bnfold-ort-{self.proc.pid}").start()
        # Refers to the process, not to self, so that it can run when self is collected.
        self._finalizer = weakref.finalize(self, _stop, self.proc, self._stderr)

    def request(self, model: Path, inputs: Path, outputs: Path, timeout: float | None = None) -> OrtFailure | None:
        """Run one request; None on success, else what went wrong. ``timeout``: None for the worker's own."""
        seconds = self.timeout if timeout is None else check_timeout(timeout)
        if not self._finalizer.alive:  # closed, or stopped by an earlier timeout
            self._start()
        try:
            self._send({"model": str(model), "inputs": str(inputs), "outputs": str(outputs)})
            answer = self._answer(time.monotonic() + seconds)
        except BaseException:
            self.close()  # interrupted while the child works: it must not outlive the request
            raise
        if answer == "ok":
            return None
        if answer is None:
            self.close()
            return OrtFailure(TIMEOUT, f"onnxruntime did not finish within {seconds:g} s and was stopped (--timeout)")
        stage, _, reason = answer.removeprefix("error ").partition(" ")
        if answer.startswith("error ") and stage in (LOAD, RUN):
            verb = "could not load the graph" if stage == LOAD else "failed running the graph"
            return OrtFailure(stage, f"onnxruntime {verb}: {reason}")
        return self._crash(answer)

    def _send(self, request: dict[str, str]) -> None:
        with contextlib.suppress(OSError):  # a dead child: its closed pipe is reported as a crash by _answer
            self.proc.stdin.write(json.dumps(request) + "\n")
            self.proc.stdin.flush()

    def _answer(self, deadline: float) -> str | None:
        """The child's answer; "" when it closed its stdout (it died), None when the deadline passed first."""
        while True:
            try:
                line = self._lines.get(timeout=max(deadline - time.monotonic(), 0.0))
            except queue.Empty:
                return None
            if line is _EOF:
                return ""
            if line != "ready":
                return line

    def _crash(self, answer: str) -> OrtFailure:
        """The child died (or answered outside the protocol): its exit status and the last line of its stderr."""
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=_REAP_S if not answer else 0)
        code = self.proc.poll()
        self._stderr.seek(0)
        last = (self._stderr.read().strip().splitlines() or [""])[-1][:300]
        self.close()
        if code is None:
            how = f"worker answered {answer[:100]!r} instead of ok/error and was stopped"
        else:
            how = f"was killed by signal {-code}" if code < 0 else f"exited with {code}"
        return OrtFailure(CRASH, f"onnxruntime {how}: {last}".rstrip(": "))

    def close(self) -> None:
        """Kill and reap the child. It holds nothing worth a graceful exit (it writes its outputs before it
        answers ok), and killing it at once means closing never waits on a busy or hung onnxruntime."""
        self._finalizer()

    def __enter__(self) -> OrtWorker:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def run_onnxruntime(path: Path, cases: dict[str, tuple[torch.Tensor, ...]], workdir: Path,
                    worker: OrtWorker | None = None, timeout: float | None = None) -> OrtRun:
    """Run every case in onnxruntime, in ``worker`` or a child started (and stopped) here.

    ``timeout``: seconds the request may take; None for the worker's own (DEFAULT_ORT_TIMEOUT_S for one started
    here). A failure of any kind is returned in ``OrtRun.failure``, never raised.
    """
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
        failure = worker.request(path, inputs_path, outputs_path, timeout)
    if failure:
        return OrtRun(failure=failure)
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
