"""Run ONNX models in onnxruntime, in a child process (``python bnfold/ort_worker.py --serve``).

onnxruntime can crash (segfault) on malformed training-mode graphs; in a child process a crash becomes a
finding instead of a dead CI job. Each input set runs once in a session with all graph optimisations (as
deployed: that output is compared with PyTorch), then twice in *one* session with optimisations off: the
optimiser rewrites or removes training-mode Dropout/BN depending on the level, and a seeded Dropout repeats
its mask across fresh sessions, so only two runs of the graph as written, in one session, show randomness.

It imports only numpy and onnxruntime (run as a file, not ``-m bnfold...``, which would import torch), and
starts early (``--serve``) so that importing onnxruntime overlaps with the audit and the export,
then reads one JSON request a line on stdin, ``{"model": ..., "inputs": ..., "outputs": ...}``, and answers
``ok`` or ``error <message>`` on stdout. INPUTS.npz holds arrays named ``<case>/<input name>``; OUTPUTS.npz
gets ``<case>/<output index>/<run>`` (run 0: optimised; runs 1 and 2: as written, one session).
"""

from __future__ import annotations

import json
import sys

import numpy as np


def run(model_path: str, inputs_path: str, outputs_path: str) -> None:
    import onnxruntime as ort

    sessions = []
    for level in (ort.GraphOptimizationLevel.ORT_ENABLE_ALL, ort.GraphOptimizationLevel.ORT_DISABLE_ALL):
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.graph_optimization_level = level
        sessions.append(ort.InferenceSession(model_path, options, providers=["CPUExecutionProvider"]))
    optimised, as_written = sessions
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


def serve() -> int:
    import onnxruntime  # noqa: F401 - the slow import happens now, while the parent works

    print("ready", flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        try:
            run(request["model"], request["inputs"], request["outputs"])
            print("ok", flush=True)
        except Exception as exc:  # report onnxruntime's own errors as data: the parent decides
            text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            print(f"error {type(exc).__name__}: {text[:300]}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(serve() if sys.argv[1:] == ["--serve"] else run(*sys.argv[1:4]) or 0)
