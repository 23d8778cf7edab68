"""``bnfold fuse model.onnx``: fold the BatchNormalization nodes of an ONNX graph and prove it in onnxruntime.

The proof runs onnxruntime **with graph optimisations disabled** on both graphs (its own Conv+BN fusion would
otherwise hide a wrong fold), on seeded inputs whose shapes and dtypes come from the graph: a symbolic batch
axis is checked at 1 and at the given batch (2 when none is given); any other symbolic dimension needs
``--input-shape``. Same Polygraphy-style report as the torch side.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import helper

from bnfold.compare import compare
from bnfold.errors import InputSpecError, LoadError, first_line
from bnfold.fold.result import FuseResult
from bnfold.inputs import SHAPE_HINT, InputSpec
from bnfold.onnx.fold import fold_graph
from bnfold.onnx.dims import fixed_size, open_zero_dims, written, zero_dims
from bnfold.onnx.graph import graph_inputs
from bnfold.onnx.io import save_onnx
from bnfold.onnx.runner import DEFAULT_ORT_TIMEOUT_S, OrtFailure, OrtWorker, run_onnxruntime
from bnfold.runtime import parity_inputs

AS_WRITTEN = 1  # run index in the worker's answer: the session with optimisations off


def input_specs(model: onnx.ModelProto, given: list[InputSpec] | None = None) -> tuple[list[InputSpec], bool]:
    """Input specs from the graph, and whether its batch axis is symbolic (dynamic: see :mod:`bnfold.onnx.dims`).

    ``given`` (``--input-shape``) wins; it must have one spec per graph input and match every fixed dimension.
    Without it, a dynamic batch axis is drawn at 1 (and compared at another size too); any other dynamic
    dimension needs ``--input-shape``.
    """
    inputs = graph_inputs(model.graph)
    if given:
        if len(given) != len(inputs):
            raise InputSpecError(f"the graph has {len(inputs)} input(s) ({', '.join(i.name for i in inputs)}), "
                                 f"--input-shape gave {len(given)}", SHAPE_HINT)
        for spec, value in zip(given, inputs):
            _check_given(spec, value)
        return list(given), any(fixed_size(d) is None for i in inputs for d in i.type.tensor_type.shape.dim[:1])
    specs, symbolic_batch = [], False
    for value in inputs:
        tensor_type = value.type.tensor_type
        if not tensor_type.HasField("shape"):
            raise InputSpecError(f"ONNX input {value.name!r} declares no shape", SHAPE_HINT)
        dims = []
        for axis, dim in enumerate(tensor_type.shape.dim):
            size = fixed_size(dim)
            if size is not None:
                dims.append(size)
            elif axis == 0:
                symbolic_batch = True
                dims.append(1)
            else:
                said = repr(dim.dim_param) if dim.HasField("dim_param") else written(dim)
                raise InputSpecError(f"ONNX input {value.name!r} has a symbolic dimension {axis} ({said}): bnfold "
                                     "cannot guess its size", SHAPE_HINT)
        specs.append(InputSpec(tuple(dims), _torch_dtype(tensor_type.elem_type, value.name)))
    return specs, symbolic_batch


def _check_given(spec: InputSpec, value: onnx.ValueInfoProto) -> None:
    dims = value.type.tensor_type.shape.dim
    if len(dims) and len(dims) != len(spec.shape):
        raise InputSpecError(f"ONNX input {value.name!r} has rank {len(dims)}, --input-shape {spec} has rank "
                             f"{len(spec.shape)}", SHAPE_HINT)
    for axis, (dim, size) in enumerate(zip(dims, spec.shape)):
        fixed = fixed_size(dim)
        if fixed is not None and fixed != size:
            raise InputSpecError(f"ONNX input {value.name!r} dimension {axis} is fixed at {fixed}, "
                                 f"--input-shape {spec} says {size}", SHAPE_HINT)


def _torch_dtype(elem_type: int, name: str) -> torch.dtype:
    if elem_type == onnx.TensorProto.BFLOAT16:
        return torch.bfloat16
    try:
        numpy_dtype = helper.tensor_dtype_to_np_dtype(elem_type)
        return torch.from_numpy(np.zeros(0, dtype=numpy_dtype)).dtype
    except (KeyError, TypeError, ValueError):
        known = elem_type in onnx.TensorProto.DataType.values()
        label = onnx.TensorProto.DataType.Name(elem_type) if known else f"{elem_type} (not an ONNX type)"
        raise InputSpecError(f"ONNX input {name!r} has element type {label}, which bnfold cannot draw inputs for",
                             SHAPE_HINT) from None


def _check_valid(model: onnx.ModelProto, path: Path | None) -> None:
    """The input must pass onnx.checker (by path: a model past 2 GB cannot be checked in memory)."""
    try:
        onnx.checker.check_model(str(path) if path is not None else model)
    except Exception as exc:  # noqa: BLE001 - the checker raises several types; all mean "invalid graph"
        raise LoadError(f"{path or 'the model'}: not a valid ONNX model: {first_line(exc, 200)}",
                        "re-export it; bnfold folds graphs that pass onnx.checker") from None


def _checker_failure(path: Path) -> OrtFailure | None:
    """The folded graph must pass onnx.checker's full check before it is compared (and ever written)."""
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as exc:  # noqa: BLE001 - the checker raises several types; all mean "invalid graph"
        return OrtFailure("load", f"onnx.checker refuses the folded graph: {first_line(exc, 300)}")
    return None


def comparison_cases(specs: list[InputSpec], symbolic_batch: bool, seed: int) -> list[tuple[str, tuple]]:
    """Batch 1 and another size when the batch axis is symbolic; the graph's own batch otherwise."""
    if not symbolic_batch or not specs or not specs[0].shape:
        return parity_inputs(specs, seed, fixed_batch=True)
    if specs[0].shape[0] == 1:
        specs = [spec.with_batch(2) for spec in specs]
    return parity_inputs(specs, seed)


def run_as_written(path: Path, cases: list[tuple[str, tuple]], worker: OrtWorker, workdir: Path
                   ) -> dict[str, list[np.ndarray]] | OrtFailure:
    """Outputs of the graph as written (optimisations off), per case label, in graph-output order."""
    run = run_onnxruntime(path, dict(cases), workdir, worker)
    if run.failure:
        return run.failure
    return {label: runs[AS_WRITTEN] for label, runs in run.outputs.items()}


def fuse_onnx(model: onnx.ModelProto, path: Path | None = None, specs: list[InputSpec] | None = None, *,
              atol: float | None = None, rtol: float | None = None, seed: int = 0,
              timeout: float | None = None, consume: bool = False) -> FuseResult:
    """Fold ``model`` (read from ``path``; None: it is written to a temporary folder to run it) and compare the
    folded graph with it in onnxruntime. ``result.model`` is the folded ``ModelProto``; ``model`` is not modified
    unless ``consume`` (it is then folded in place: one model in memory, for a caller done with the original,
    which onnxruntime reads from ``path``). Input dimensions written as ``dim_value 0`` (dynamic, as older
    exporters write it) become ``dim_param``s in the folded graph, and in the copy of the original that is run
    (:func:`bnfold.onnx.dims.open_zero_dims`).
    """
    if not graph_inputs(model.graph):
        raise InputSpecError("the graph takes no inputs: its outputs are constants, so there is nothing to compare",
                             "fold the graph it was made from, or run onnxruntime's constant folding on it")
    _check_valid(model, path)
    specs, symbolic_batch = input_specs(model, specs)
    opened = None
    if zero_dims(model):  # the original runs from a copy that onnxruntime can run at these sizes
        if not consume:
            model = _copy(model)
        opened, path = open_zero_dims(model), None
    cases = comparison_cases(specs, symbolic_batch, seed)
    names = [o.name for o in model.graph.output]
    timings: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="bnfold-") as tmp:
        if path is None:  # onnxruntime reads the original from a file: write it before anything changes
            path = Path(tmp) / "original" / "model.onnx"
            path.parent.mkdir()
            save_onnx(model, path)
        start = time.perf_counter()
        folded = fold_graph(model, copy=not consume)
        timings["fold"] = time.perf_counter() - start
        result = _prove(folded, path, names, cases, Path(tmp), atol, rtol, timeout, timings)
    result.notes[:0] = [opened] if opened else []
    return result


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    copied = onnx.ModelProto()
    copied.CopyFrom(model)
    return copied


def _prove(folded: Any, path: Path, names: list[str], cases: list[tuple[str, tuple]], tmp: Path, atol, rtol,
           timeout: float | None, timings: dict[str, float]) -> FuseResult:
    """Run the original (``path``) and the folded graph in onnxruntime, optimisations off, and compare."""
    with OrtWorker(timeout=timeout or DEFAULT_ORT_TIMEOUT_S) as worker:
        start = time.perf_counter()
        expected = run_as_written(path, cases, worker, tmp)
        if isinstance(expected, OrtFailure):
            raise InputSpecError(f"onnxruntime cannot run {path}: {expected.message}", expected.advice)
        candidate = tmp / "folded" / path.name
        candidate.parent.mkdir()
        save_onnx(folded.model, candidate)
        invalid = _checker_failure(candidate)
        got = invalid or run_as_written(candidate, cases, worker, tmp)
        timings["compare"] = time.perf_counter() - start
    folded_names = [o.name for o in folded.model.graph.output]
    parity = []
    for label, _ in cases:  # by output name: a missing or extra output fails, it is not zipped away
        outputs = {} if isinstance(got, OrtFailure) else dict(zip(folded_names, got[label]))
        parity.append(compare(label, dict(zip(names, expected[label])), outputs, atol, rtol))
    notes = list(folded.notes)
    if isinstance(got, OrtFailure):
        notes.append(f"the folded graph does not run in onnxruntime: {got.message}")
    return FuseResult(model=folded.model, folded=list(folded.folded), skipped=list(folded.skipped), parity=parity,
                      discovery="onnx", notes=notes, timings=timings, affine=list(folded.affine))
