"""onnxruntime in a child process (``bnfold/ort_worker.py``), under a per-request timeout.

Neither a crash nor a graph that loops for hours takes the caller down with it. What goes wrong there is one
of four kinds (``OrtFailure.kind``), each a BN010 finding with its own hint: the graph does not load, it loads
but does not run, it runs past the timeout, or the process crashes.
"""

from __future__ import annotations

import contextlib
import json
import math
import queue
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import onnx
import torch

from bnfold.errors import BnfoldError
from bnfold.findings import Finding
from bnfold.onnx.dims import fixed_size
from bnfold.onnx.graph import graph_inputs
from bnfold.ort_worker import LOAD, RUN

_WORKER = Path(__file__).resolve().parent.parent / "ort_worker.py"

#: Seconds one onnxruntime request (two sessions created, every comparison input run three times) may take.
#: A ResNet-50-sized graph at batch 8 needs well under a minute on a CI runner's CPU; 300 s leaves ample room
#: for slower runners and larger graphs, yet stops a graph that never finishes long before a typical CI job
#: timeout would kill the whole run without a report. ``--timeout SECONDS`` changes it.
DEFAULT_ORT_TIMEOUT_S = 300.0
#: Seconds to wait for a child that was killed, or that closed its pipe, to be reaped: it is already dying.
_REAP_S = 5.0


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
    input_names = [i.name for i in graph_inputs(model.graph)]
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
    inputs = graph_inputs(onnx.load(str(path), load_external_data=False).graph)
    dims = inputs[0].type.tensor_type.shape.dim if inputs else ()
    return fixed_size(dims[0]) if dims else None
