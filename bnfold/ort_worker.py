"""Run ONNX models in onnxruntime, in a child process (``python bnfold/ort_worker.py --serve``).

onnxruntime can crash (segfault) on malformed training-mode graphs, and a graph can loop for hours; in a
child process a crash becomes a finding and a hang is stopped by the parent's timeout, instead of a dead CI
job. Each input set runs once in a session with all graph optimisations (as deployed: that output is
compared with PyTorch), then twice in *one* session with optimisations off: the optimiser rewrites or removes
training-mode Dropout/BN depending on the level, and a seeded Dropout repeats its mask across fresh sessions,
so only two runs of the graph as written, in one session, show randomness.

It imports only numpy and onnxruntime (run as a file, not ``-m bnfold...``, which would import torch), and
starts early (``--serve``) so that importing onnxruntime overlaps with the audit and the export. Protocol,
one line each way: it prints ``ready`` once imported, then reads one JSON request a line on stdin,
``{"model": ..., "inputs": ..., "outputs": ...}``, and answers on stdout with one of

- ``ok``: OUTPUTS.npz is written;
- ``error load <Type>: <reason>``: onnxruntime could not create a session (unsupported op, opset, invalid graph);
- ``error run <Type>: <reason>``: the sessions exist but running the inputs (or reading/writing files) failed.

``<reason>`` is the whole first line of onnxruntime's message, never cut. A timeout or a crash has no answer:
the parent tells them apart (it stops the process itself on a timeout; a crash closes the pipe).
INPUTS.npz holds arrays named ``<case>/<input name>``; OUTPUTS.npz gets ``<case>/<output index>/<run>``
(run 0: optimised; runs 1 and 2: as written, one session).
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any, TextIO

# Run as a file, this folder is sys.path[0]: bnfold's own modules (inputs, data, config...) must not shadow
# what numpy and onnxruntime import.
if sys.path and os.path.abspath(sys.path[0] or ".") == os.path.dirname(os.path.abspath(__file__)):
    del sys.path[0]

import numpy as np  # after the sys.path fix above

#: The stages an ``error`` answer names (the parent maps each to its own hint).
LOAD, RUN = "load", "run"


class StageError(Exception):
    """An exception raised in one stage of a request; ``stage`` is LOAD or RUN."""

    def __init__(self, stage: str, cause: BaseException) -> None:
        super().__init__(stage, cause)
        self.stage, self.cause = stage, cause

    def answer(self) -> str:
        """The protocol line: the stage, the exception type and the whole first line of its message."""
        lines = str(self.cause).strip().splitlines()
        reason = lines[0] if lines else "(no message)"
        return f"error {self.stage} {type(self.cause).__name__}: {reason}"


def load_sessions(model_path: str) -> tuple[Any, Any]:
    """Two sessions: all optimisations (as deployed) and none (the graph as written)."""
    import onnxruntime as ort

    sessions = []
    for level in (ort.GraphOptimizationLevel.ORT_ENABLE_ALL, ort.GraphOptimizationLevel.ORT_DISABLE_ALL):
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.graph_optimization_level = level
        sessions.append(ort.InferenceSession(model_path, options, providers=["CPUExecutionProvider"]))
    optimised, as_written = sessions
    return optimised, as_written


def run_cases(optimised: Any, as_written: Any, inputs_path: str, outputs_path: str) -> None:
    arrays = np.load(inputs_path)
    cases: dict[str, dict[str, np.ndarray]] = {}
    for key in arrays.files:
        case, _, name = key.partition("/")
        cases.setdefault(case, {})[name] = arrays[key]
    results: dict[str, np.ndarray] = {}
    for case, feeds in cases.items():
        for attempt, session in enumerate((optimised, as_written, as_written)):
            for i, value in enumerate(session.run(None, feeds)):
                results[f"{case}/{i}/{attempt}"] = np.asarray(value)
    np.savez(outputs_path, **results)


def run(model_path: str, inputs_path: str, outputs_path: str) -> None:
    """One request; raises StageError saying whether loading or running failed."""
    try:
        optimised, as_written = load_sessions(model_path)
    except Exception as exc:
        raise StageError(LOAD, exc) from exc
    try:
        run_cases(optimised, as_written, inputs_path, outputs_path)
    except Exception as exc:
        raise StageError(RUN, exc) from exc


def _protocol_channel() -> TextIO:
    """Keep stdout for answers only: file descriptor 1 is pointed at stderr, so anything onnxruntime or a
    custom op prints from C++ lands in the parent's stderr log instead of being read as an answer."""
    channel = os.fdopen(os.dup(1), "w", buffering=1)
    sys.stdout.flush()
    os.dup2(2, 1)
    return channel


def _die_with_parent() -> None:
    """Linux: the kernel stops this process when its parent dies, however it dies (SIGKILL included), so a
    graph that loops for hours never outlives the bnfold that started it."""
    try:
        import ctypes
        import signal

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the parent's timeout and kill still apply
        pass


def serve() -> int:
    _die_with_parent()
    channel = _protocol_channel()
    import onnxruntime  # noqa: F401 - the slow import happens now, while the parent works

    print("ready", file=channel, flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        try:
            run(request["model"], request["inputs"], request["outputs"])
            answer = "ok"
        except StageError as exc:  # report onnxruntime's own errors as data: the parent decides
            answer = exc.answer()
        print(answer, file=channel, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(serve() if sys.argv[1:] == ["--serve"] else run(*sys.argv[1:4]) or 0)
