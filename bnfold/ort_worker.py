"""Run an ONNX model in onnxruntime, in a child process (``python -m bnfold.ort_worker``).

onnxruntime can crash (segfault) on malformed training-mode graphs; in a child process a crash becomes a
finding instead of a dead CI job. Each input set runs twice in the *same* session, so a stochastic op
shows up (a seeded Dropout repeats its mask across fresh sessions, not within one).

Usage: python -m bnfold.ort_worker MODEL.onnx INPUTS.npz OUTPUTS.npz
INPUTS.npz holds arrays named ``<case>/<input name>``; OUTPUTS.npz gets ``<case>/<output index>/<run>``.
"""

from __future__ import annotations

import sys

import numpy as np


def main(model_path: str, inputs_path: str, outputs_path: str) -> int:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(model_path, options, providers=["CPUExecutionProvider"])
    arrays = np.load(inputs_path)
    cases: dict[str, dict[str, np.ndarray]] = {}
    for key in arrays.files:
        case, _, name = key.partition("/")
        cases.setdefault(case, {})[name] = arrays[key]
    results: dict[str, np.ndarray] = {}
    for case, feeds in cases.items():
        for run in range(2):
            for i, value in enumerate(session.run(None, feeds)):
                results[f"{case}/{i}/{run}"] = np.asarray(value)
    np.savez(outputs_path, **results)
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:4]))
