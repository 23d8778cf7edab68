"""Output comparison with Polygraphy's semantics.

Both sides are cast to float64. For every output: the absolute error ``|got - ref|`` per element, and the
relative error *to the output's scale* ``|got - ref| / max(|ref|)`` (per-element relative error explodes
near zero, which says nothing about a network's output). An element fails only when it exceeds **both**
``atol`` and ``rtol``. An output fails outright on a shape mismatch and on any NaN or Inf, on either side:
a model's eval output on finite inputs is finite, so NaN matching NaN is two broken models, not parity.
The error statistics are taken over the elements finite on both sides (infinite when there are none).
Each result records the worst element's index and both values there, and the smallest rtol that would have
passed with this atol (``required_rtol``), so a failure tells the user what to look at and what a passing run
needs.

This is bnfold's one comparison: parity (fold, ONNX, ``bnfold export``), the BN010 culprit search, and the
audit's probes, which compare two runs of one model output by output at atol 0 (a NaN or Inf in one run only
is an infinite change, never none).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from numbers import Real
from typing import Any

import numpy as np
import torch

from bnfold.errors import InputSpecError
from bnfold.inputs import dtype_name

#: Default tolerances per output dtype: (atol, rtol relative to the output's max magnitude).
DEFAULT_TOLERANCES: dict[str, tuple[float, float]] = {
    "float64": (1e-10, 1e-9),
    "float32": (1e-5, 1e-4),
    "float16": (1e-3, 1e-2),
    "bfloat16": (1e-2, 5e-2),
}


def default_tolerance(dtype: str) -> tuple[float, float]:
    return DEFAULT_TOLERANCES.get(dtype, DEFAULT_TOLERANCES["float32"])


def check_tolerance(name: str, value: Any) -> float | None:
    """``value`` as a float if it is a usable tolerance; None (the per-dtype default) passes through.

    NaN or Inf would turn every failure into a pass (no error exceeds them) and a negative one fails identical
    outputs, so they are refused, as are non-numbers (bool, str). ``name`` is what the user wrote: ``--atol``
    on the command line, ``atol`` in Python.
    """
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value) or value < 0:
        atol, rtol = default_tolerance("float32")
        raise InputSpecError(f"{name} must be a finite number >= 0, got {value!r}",
                             f"omit it for the per-dtype default (float32: atol {atol:g}, rtol {rtol:g}); an element "
                             "fails only when it exceeds both atol and rtol")
    return float(value)


def resolve_tolerances(dtype: str, atol: Any, rtol: Any) -> tuple[float, float]:
    """Checked (atol, rtol), each falling back to ``dtype``'s default when None."""
    d_atol, d_rtol = default_tolerance(dtype)
    atol, rtol = check_tolerance("atol", atol), check_tolerance("rtol", rtol)
    return (d_atol if atol is None else atol), (d_rtol if rtol is None else rtol)


@dataclass(frozen=True)
class OutputDiff:
    """How one output differs from its reference."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    max_abs: float
    max_rel: float  # to the output's scale
    mean_abs: float
    worst_index: tuple[int, ...]
    ref_value: float
    got_value: float
    scale: float
    atol: float
    rtol: float
    required_rtol: float  # the smallest rtol that passes with this atol; inf when none can (NaN, shapes)
    passed: bool
    problem: str | None = None  # shape mismatch, NaN, ...

    def figure(self) -> str:
        """One phrase for messages: the errors, where the worst is, and what else is wrong (NaN, shape)."""
        where = f" at {self.worst_index}" if self.worst_index else ""
        text = f"max abs {self.max_abs:.3g}, max rel {self.max_rel:.3g}{where} in {self.name}"
        return f"{text} ({self.problem})" if self.problem else text

    def to_dict(self) -> dict[str, Any]:
        return {
            "output": self.name,
            "shape": list(self.shape),
            "dtype": self.dtype,
            "max_abs": self.max_abs,
            "max_rel": self.max_rel,
            "mean_abs": self.mean_abs,
            "worst_index": list(self.worst_index),
            "ref_value": self.ref_value,
            "got_value": self.got_value,
            "scale": self.scale,
            "atol": self.atol,
            "rtol": self.rtol,
            "required_rtol": self.required_rtol,
            "passed": self.passed,
            "problem": self.problem,
        }


@dataclass
class Comparison:
    """All outputs of one run compared; truthy when every output passed."""

    label: str
    outputs: list[OutputDiff] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return bool(self.outputs) and all(o.passed for o in self.outputs)

    def __bool__(self) -> bool:
        return self.ok

    def worst(self) -> OutputDiff | None:
        """The failing output furthest from passing (NaN/Inf and shape mismatches first), else the closest call."""
        failing = [o for o in self.outputs if not o.passed]
        pool = failing or self.outputs
        return max(pool, key=lambda o: (o.required_rtol, o.max_rel)) if pool else None

    def to_dict(self) -> dict[str, Any]:
        return {"label": self.label, "ok": self.ok, "outputs": [o.to_dict() for o in self.outputs]}


def flatten_outputs(obj: Any, prefix: str = "output") -> dict[str, Any]:
    """Name every tensor in a (nested) tuple/list/dict output: ``output``, ``output[0]``, ``output['logits']``."""
    if isinstance(obj, dict):
        items: dict[str, Any] = {}
        for key, value in obj.items():
            items.update(flatten_outputs(value, f"{prefix}[{key!r}]"))
        return items
    if isinstance(obj, (tuple, list)):
        items = {}
        for i, value in enumerate(obj):
            items.update(flatten_outputs(value, f"{prefix}[{i}]"))
        return items
    if hasattr(obj, "_fields") and hasattr(obj, "_asdict"):  # namedtuple
        return flatten_outputs(obj._asdict(), prefix)
    return {prefix: obj}


def _as_array(value: Any) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", torch.float64).numpy()
    return np.asarray(value, dtype=np.float64)


def _dtype_name(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return dtype_name(value.dtype)
    return str(np.asarray(value).dtype)


def _unmatched(name: str, shape: tuple[int, ...], dtype: str, atol: float, rtol: float, problem: str) -> OutputDiff:
    """An output that could not be compared element by element: it fails, with infinite errors."""
    return OutputDiff(name=name, shape=shape, dtype=dtype, max_abs=math.inf, max_rel=math.inf, mean_abs=math.inf,
                      worst_index=(), ref_value=math.nan, got_value=math.nan, scale=math.nan, atol=atol, rtol=rtol,
                      required_rtol=math.inf, passed=False, problem=problem)


def _index(flat: int, shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(int(i) for i in np.unravel_index(flat, shape))


def _non_finite(side: str, values: np.ndarray) -> str | None:
    """``"reference has 12 non-finite value(s) (first at (0, 3))"``, or None when every value is finite."""
    bad = ~np.isfinite(values)
    count = int(bad.sum())
    if not count:
        return None
    return f"{side} has {count} non-finite value(s) (first at {_index(int(np.argmax(bad)), values.shape)})"


def _non_finite_problem(ref: np.ndarray, got: np.ndarray) -> str | None:
    sides = [p for p in (_non_finite("reference", ref), _non_finite("compared output", got)) if p]
    return "; ".join(sides) + "; a model's eval output on finite inputs must be finite" if sides else None


def compare_output(name: str, ref: Any, got: Any, atol: float | None = None, rtol: float | None = None) -> OutputDiff:
    """Compare one output with its reference (semantics in the module docstring); None tolerances: per dtype."""
    dtype = _dtype_name(ref)
    atol, rtol = resolve_tolerances(dtype, atol, rtol)
    a, b = _as_array(ref), _as_array(got)
    common = dict(name=name, shape=tuple(a.shape), dtype=dtype, atol=atol, rtol=rtol)
    if a.shape != b.shape:
        return _unmatched(**common, problem=f"shape {tuple(b.shape)} != reference {tuple(a.shape)}")
    if a.size == 0:
        return OutputDiff(**common, max_abs=0.0, max_rel=0.0, mean_abs=0.0, worst_index=(), ref_value=0.0,
                          got_value=0.0, scale=0.0, required_rtol=0.0, passed=True)
    problem = _non_finite_problem(a, b)
    comparable = np.flatnonzero(np.isfinite(a) & np.isfinite(b))  # flat indices of the elements we can measure
    if comparable.size == 0:
        return _unmatched(**common, problem=problem)
    ref_flat, got_flat = a.ravel()[comparable], b.ravel()[comparable]
    scale = float(np.max(np.abs(a[np.isfinite(a)])))
    err = np.abs(got_flat - ref_flat)
    rel = err / scale if scale > 0 else np.where(err > 0, np.inf, 0.0)
    beyond_atol = err > atol
    # Only elements beyond atol can fail, so the worst relative error among them is the rtol a pass needs.
    required_rtol = math.inf if problem else float(np.max(rel[beyond_atol], initial=0.0))
    worst = int(np.argmax(err))
    return OutputDiff(
        **common,
        max_abs=float(err[worst]),
        max_rel=float(np.max(rel)),
        mean_abs=float(np.mean(err)),
        worst_index=_index(int(comparable[worst]), a.shape),
        ref_value=float(ref_flat[worst]),
        got_value=float(got_flat[worst]),
        scale=scale,
        required_rtol=required_rtol,
        passed=problem is None and not bool((beyond_atol & (rel > rtol)).any()),
        problem=problem,
    )


def compare(label: str, ref: Any, got: Any, atol: float | None = None, rtol: float | None = None) -> Comparison:
    """Compare two (nested) model outputs; outputs are matched by their names."""
    # Refused up front, so that a bad tolerance raises even when there is no output to compare.
    check_tolerance("atol", atol)
    check_tolerance("rtol", rtol)
    ref_items, got_items = flatten_outputs(ref), flatten_outputs(got)
    result = Comparison(label)
    for name, ref_value in ref_items.items():
        if name not in got_items:
            dtype = _dtype_name(ref_value)
            result.outputs.append(_unmatched(name, tuple(getattr(ref_value, "shape", ())), dtype,
                                             *resolve_tolerances(dtype, atol, rtol), "output missing"))
            continue
        result.outputs.append(compare_output(name, ref_value, got_items[name], atol, rtol))
    return result
