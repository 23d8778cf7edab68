"""Example inputs: parsing ``--input-shape`` and making seeded random tensors.

A spec reads ``SHAPE[:DTYPE[:LOW..HIGH]]``: ``1,3,224,224`` (or ``1x3x224x224``), ``1,128:int64``,
``8,128:int64:0..30522`` (token ids), ``1,3,8,8:float32:0..1``. Without a range, floating inputs are standard
normal and integer inputs are drawn from 0..7; with one, both are uniform on [LOW, HIGH) (torch.randint's
convention), so token ids and class indices stay valid for the model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from numbers import Integral, Real

import torch

from bnfold.errors import InputSpecError

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float64": torch.float64, "fp64": torch.float64, "double": torch.float64,
    "int64": torch.int64, "long": torch.int64, "int32": torch.int32, "int": torch.int32, "int16": torch.int16,
    "int8": torch.int8, "uint8": torch.uint8, "bool": torch.bool,
}
SHAPE_HINT = ("pass --input-shape N,C,H,W (repeat it for several inputs; add :float16 etc. for another dtype, "
              "and :LOW..HIGH for a value range, e.g. 8,128:int64:0..30522)")
RANGE_HINT = "write the range as LOW..HIGH after the dtype, e.g. 8,128:int64:0..30522 or 1,3,8,8:float32:0..1"
#: Integers drawn when a spec gives no range (kept so that seeded draws do not change).
_DEFAULT_INT_RANGE = (0, 8)
_DIM = re.compile(r"[0-9]+")
_INTEGER = re.compile(r"[+-]?[0-9]+")


def _is_integer(dtype: torch.dtype) -> bool:
    return not (dtype.is_floating_point or dtype.is_complex or dtype == torch.bool)


def dtype_name(dtype: torch.dtype) -> str:
    """``float32``, not ``torch.float32``: how a dtype is written in messages (and in ``--input-shape``)."""
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class InputSpec:
    """Shape, dtype and optional value range [low, high) of one example input (None: the default draw)."""

    shape: tuple[int, ...]
    dtype: torch.dtype = torch.float32
    low: int | float | None = None
    high: int | float | None = None

    def __post_init__(self) -> None:
        if self.low is None and self.high is None:
            return
        reason = _range_problem(self.dtype, self.low, self.high)
        if reason:
            raise InputSpecError(f"input range {self.low!r}..{self.high!r} for {dtype_name(self.dtype)} inputs: "
                                 f"{reason}", RANGE_HINT)
        # Plain int/float bounds (not numpy scalars), so that str() writes them back as the parser reads them.
        kind = int if _is_integer(self.dtype) else float
        object.__setattr__(self, "low", kind(self.low))
        object.__setattr__(self, "high", kind(self.high))

    @property
    def has_range(self) -> bool:
        return self.low is not None

    def __str__(self) -> str:
        """The ``--input-shape`` text that parses back to this spec."""
        text = ",".join(str(d) for d in self.shape)
        if self.dtype != torch.float32 or self.has_range:
            text += f":{dtype_name(self.dtype)}"
        if self.has_range:
            text += f":{self.low!r}..{self.high!r}"
        return text

    def with_batch(self, batch: int) -> InputSpec:
        return dataclasses.replace(self, shape=(batch, *self.shape[1:])) if self.shape else self


def _integer_limits(dtype: torch.dtype) -> tuple[int, int]:
    """The widest [low, high) an integer draw can have: the dtype's values, and torch.randint's int64 ``high``."""
    info = torch.iinfo(dtype)
    return info.min, min(info.max + 1, torch.iinfo(torch.int64).max)


def _float_limits(low: float, high: float, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The smallest ``dtype`` value >= low and the largest < high: draws are clamped to these after rounding."""
    lo, hi = torch.tensor(low, dtype=dtype), torch.tensor(high, dtype=dtype)
    if lo.double() < low:
        lo = torch.nextafter(lo, torch.tensor(math.inf, dtype=dtype))
    if hi.double() >= high:
        hi = torch.nextafter(hi, torch.tensor(-math.inf, dtype=dtype))
    return lo, hi


def _range_problem(dtype: torch.dtype, low: object, high: object) -> str | None:
    """Why [low, high) is not a valid range for ``dtype`` inputs, or None."""
    if low is None or high is None:
        return "give both LOW and HIGH, or neither"
    if dtype == torch.bool or dtype.is_complex:
        return f"{dtype_name(dtype)} inputs take no range; drop it"
    numbers = (low, high)
    if any(isinstance(v, bool) or not isinstance(v, Real) for v in numbers):
        return "LOW and HIGH must be numbers"
    if not all(isinstance(v, Integral) or math.isfinite(v) for v in numbers):  # huge ints overflow isfinite
        return "LOW and HIGH must be finite"
    if not low < high:
        return "the range is empty: LOW must be < HIGH"
    if _is_integer(dtype):
        if not all(isinstance(v, Integral) for v in numbers):
            return f"{dtype_name(dtype)} inputs need integer bounds"
        smallest, largest = _integer_limits(dtype)
        if low < smallest or high > largest:
            return f"{dtype_name(dtype)} draws must lie within {smallest}..{largest}"
        return None
    lo, hi = _float_limits(float(low), float(high), dtype)
    if lo > hi:
        return f"no {dtype_name(dtype)} value lies in it; widen it"
    return None


def parse_input_spec(text: str) -> InputSpec:
    """``SHAPE[:DTYPE[:LOW..HIGH]]`` -> :class:`InputSpec`, e.g. ``"1,3,224,224"`` or ``"8,128:int64:0..30522"``."""
    parts = text.strip().split(":")
    if len(parts) > 3:
        raise InputSpecError(f"cannot read input spec {text!r}: expected SHAPE[:DTYPE[:LOW..HIGH]]", SHAPE_HINT)
    shape = _parse_shape(parts[0], text)
    dtype = _parse_dtype(parts[1] if len(parts) > 1 else "", text)
    if len(parts) < 3:
        return InputSpec(shape, dtype)
    low, high = _parse_range(parts[2], dtype, text)
    return InputSpec(shape, dtype, low, high)


def _parse_shape(shape_text: str, text: str) -> tuple[int, ...]:
    """``1,3,224,224`` or ``1x3x224x224``: one separator throughout, every part a positive integer."""
    separator = "," if "," in shape_text or "x" not in shape_text.lower() else "x"
    parts = shape_text.lower().split(separator)
    for position, part in enumerate(parts, start=1):
        part = part.strip()
        if not _DIM.fullmatch(part) or int(part) == 0:
            what = repr(part) if part else "empty"
            raise InputSpecError(f"input shape {text!r}: dimension {position} is {what}, not a positive integer",
                                 SHAPE_HINT)
    return tuple(int(part) for part in parts)


def _parse_dtype(dtype_text: str, text: str) -> torch.dtype:
    key = dtype_text.strip().lower() or "float32"
    if key not in _DTYPES:
        raise InputSpecError(f"unknown input dtype {dtype_text!r} in {text!r}; known: {', '.join(sorted(_DTYPES))}")
    return _DTYPES[key]


def _parse_range(range_text: str, dtype: torch.dtype, text: str) -> tuple[int | float, int | float]:
    low_text, dots, high_text = range_text.strip().partition("..")
    if not dots:
        raise InputSpecError(f"cannot read the value range {range_text!r} in {text!r}: expected LOW..HIGH", RANGE_HINT)
    return _parse_bound(low_text, dtype, text), _parse_bound(high_text, dtype, text)


def _parse_bound(bound: str, dtype: torch.dtype, text: str) -> int | float:
    bound = bound.strip()
    if _is_integer(dtype):
        if not _INTEGER.fullmatch(bound):
            raise InputSpecError(f"range bound {bound!r} in {text!r} is not an integer; {dtype_name(dtype)} inputs "
                                 "need integer bounds", RANGE_HINT)
        return int(bound)
    try:
        return float(bound)
    except ValueError:
        raise InputSpecError(f"range bound {bound!r} in {text!r} is not a number", RANGE_HINT) from None


def _draw(spec: InputSpec, generator: torch.Generator) -> torch.Tensor:
    """One seeded input. The draws without a range are the historical ones: seeded runs must not change."""
    if spec.dtype == torch.bool:
        return torch.randint(0, 2, spec.shape, generator=generator).bool()
    if _is_integer(spec.dtype):
        low, high = (spec.low, spec.high) if spec.has_range else _DEFAULT_INT_RANGE
        return torch.randint(low, high, spec.shape, generator=generator, dtype=spec.dtype)
    if not spec.has_range:
        return torch.randn(spec.shape, generator=generator, dtype=torch.float32).to(spec.dtype)
    unit = torch.rand(spec.shape, generator=generator, dtype=torch.float32).double()
    values = (spec.low + (spec.high - spec.low) * unit).to(spec.dtype)
    # Rounding to a narrow dtype (float16 0..1 turns 0.9999 into 1.0) must not leave [low, high).
    return values.clamp(*_float_limits(float(spec.low), float(spec.high), spec.dtype))


#: Elements one drawn input may hold (1 GiB of float32): a declared shape beyond it is a mistake or an attack.
MAX_INPUT_ELEMENTS = 2**28


def _check_size(spec: InputSpec) -> None:
    elements = 1
    for dim in spec.shape:
        elements *= dim
    if elements > MAX_INPUT_ELEMENTS:
        raise InputSpecError(f"input shape {spec} holds {elements:,} elements (limit {MAX_INPUT_ELEMENTS:,})",
                             "pass a smaller --input-shape (the batch and any symbolic dimension are yours to choose)")


def make_inputs(specs: list[InputSpec], seed: int, batch: int | None = None) -> tuple[torch.Tensor, ...]:
    """Seeded inputs, one per spec (with its batch replaced by ``batch`` when given), from one generator."""
    generator = torch.Generator().manual_seed(seed)
    specs = [spec.with_batch(batch) if batch is not None else spec for spec in specs]
    for spec in specs:
        _check_size(spec)
    return tuple(_draw(spec, generator) for spec in specs)


def specs_from_tensors(tensors: tuple[torch.Tensor, ...]) -> list[InputSpec]:
    """Specs of user-given example tensors. Integer tensors (token ids, class indices) keep the range
    [min, max + 1) of their values, so that regenerated draws stay valid for the model; floats get no range."""
    return [_spec_of(t) for t in tensors]


def _spec_of(tensor: torch.Tensor) -> InputSpec:
    shape = tuple(tensor.shape)
    if not _is_integer(tensor.dtype) or tensor.numel() == 0:
        return InputSpec(shape, tensor.dtype)
    high = min(int(tensor.max()) + 1, _integer_limits(tensor.dtype)[1])
    return InputSpec(shape, tensor.dtype, int(tensor.min()), high)


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run with torch's global RNG seeded, leaving the caller's RNG state as it was.

    Comparisons run both models under the same seed, so a stochastic layer draws the same numbers for both and
    the comparison measures the folding, not the randomness (the audit's determinism probe finds that).
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield
