"""Output comparison with Polygraphy's semantics.

Both sides are cast to float64. For every output: the absolute error ``|got - ref|`` per element, and the
relative error *to the output's scale* ``|got - ref| / max(|ref|)`` (per-element relative error explodes
near zero, which says nothing about a network's output). An element fails only when it exceeds **both**
``atol`` and ``rtol``; NaN or Inf where the reference is finite always fails, and so does a shape mismatch.
Each result records the worst element's index and both values there, and the tolerance that would have
passed (``required_rtol``), so a failure tells the user what to look at and what a passing run needs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

#: Default tolerances per output dtype: (atol, rtol relative to the output's max magnitude).
DEFAULT_TOLERANCES: dict[str, tuple[float, float]] = {
    "float64": (1e-10, 1e-9),
    "float32": (1e-5, 1e-4),
    "float16": (1e-3, 1e-2),
    "bfloat16": (1e-2, 5e-2),
}


def default_tolerance(dtype: str) -> tuple[float, float]:
    return DEFAULT_TOLERANCES.get(dtype, DEFAULT_TOLERANCES["float32"])


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
    passed: bool
    problem: str | None = None  # shape mismatch, NaN, ...

    @property
    def required_rtol(self) -> float:
        """The smallest rtol that would have passed (with this atol)."""
        return self.max_rel

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
        failing = [o for o in self.outputs if not o.passed]
        pool = failing or self.outputs
        return max(pool, key=lambda o: (o.max_rel if math.isfinite(o.max_rel) else math.inf)) if pool else None

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
        return str(value.dtype).removeprefix("torch.")
    return str(np.asarray(value).dtype)


def _unmatched(name: str, shape: tuple[int, ...], dtype: str, atol: float, rtol: float, problem: str) -> OutputDiff:
    """An output that could not be compared element by element: it fails, with infinite errors."""
    return OutputDiff(name=name, shape=shape, dtype=dtype, max_abs=math.inf, max_rel=math.inf, mean_abs=math.inf,
                      worst_index=(), ref_value=math.nan, got_value=math.nan, scale=math.nan, atol=atol, rtol=rtol,
                      passed=False, problem=problem)


def compare_output(name: str, ref: Any, got: Any, atol: float | None = None, rtol: float | None = None) -> OutputDiff:
    dtype = _dtype_name(ref)
    d_atol, d_rtol = default_tolerance(dtype)
    atol = d_atol if atol is None else atol
    rtol = d_rtol if rtol is None else rtol
    a, b = _as_array(ref), _as_array(got)
    common = dict(name=name, shape=tuple(a.shape), dtype=dtype, atol=atol, rtol=rtol)
    if a.shape != b.shape:
        return _unmatched(**common, problem=f"shape {tuple(b.shape)} != reference {tuple(a.shape)}")
    if a.size == 0:
        return OutputDiff(**common, max_abs=0.0, max_rel=0.0, mean_abs=0.0, worst_index=(), ref_value=0.0,
                          got_value=0.0, scale=0.0, passed=True)
    finite_ref = np.isfinite(a)
    scale = float(np.max(np.abs(a[finite_ref]))) if finite_ref.any() else 0.0
    with np.errstate(invalid="ignore"):  # inf - inf is handled just below
        err = np.abs(b - a)
    # Non-finite where the reference is finite always fails; identical non-finite values (inf == inf) agree.
    same_nonfinite = ~finite_ref & ((a == b) | (np.isnan(a) & np.isnan(b)))
    err = np.where(same_nonfinite, 0.0, err)
    err = np.where(np.isnan(err), np.inf, err)
    rel = err / scale if scale > 0 else np.where(err > 0, np.inf, 0.0)
    flat = int(np.argmax(err))
    index = tuple(int(i) for i in np.unravel_index(flat, a.shape))
    failing = (err > atol) & (rel > rtol)
    new_nonfinite = int((~np.isfinite(b) & finite_ref).sum())
    problem = f"{new_nonfinite} non-finite value(s) where the reference is finite" if new_nonfinite else None
    return OutputDiff(
        **common,
        max_abs=float(err.flat[flat]),
        max_rel=float(np.max(rel)),
        mean_abs=float(np.mean(err)),
        worst_index=index,
        ref_value=float(a[index]),
        got_value=float(b[index]),
        scale=scale,
        passed=not bool(failing.any()),
        problem=problem,
    )


def compare(label: str, ref: Any, got: Any, atol: float | None = None, rtol: float | None = None) -> Comparison:
    """Compare two (nested) model outputs; outputs are matched by their names."""
    ref_items, got_items = flatten_outputs(ref), flatten_outputs(got)
    result = Comparison(label)
    for name, ref_value in ref_items.items():
        if name not in got_items:
            result.outputs.append(_unmatched(name, tuple(getattr(ref_value, "shape", ())), _dtype_name(ref_value),
                                             atol or 0.0, rtol or 0.0, "output missing"))
            continue
        result.outputs.append(compare_output(name, ref_value, got_items[name], atol, rtol))
    return result
