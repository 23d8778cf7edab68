"""Example inputs: parsing ``--input-shape`` and making seeded random tensors."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from bnfold.errors import InputSpecError

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float64": torch.float64, "fp64": torch.float64, "double": torch.float64,
    "int64": torch.int64, "long": torch.int64, "int32": torch.int32, "bool": torch.bool,
}
SHAPE_HINT = "pass --input-shape N,C,H,W (repeat it for several inputs; add :float16 etc. for another dtype)"


@dataclass(frozen=True)
class InputSpec:
    shape: tuple[int, ...]
    dtype: torch.dtype = torch.float32

    def __str__(self) -> str:
        text = ",".join(str(d) for d in self.shape)
        return text if self.dtype == torch.float32 else f"{text}:{str(self.dtype).removeprefix('torch.')}"

    def with_batch(self, batch: int) -> InputSpec:
        return InputSpec((batch, *self.shape[1:]), self.dtype) if self.shape else self


def parse_input_spec(text: str) -> InputSpec:
    """``"1,3,224,224"`` or ``"1,128:int64"`` -> :class:`InputSpec`."""
    shape_text, _, dtype_text = text.strip().partition(":")
    try:
        shape = tuple(int(d) for d in shape_text.replace("x", ",").split(",") if d.strip())
    except ValueError:
        raise InputSpecError(f"cannot read input shape {text!r}: expected comma-separated integers like 1,3,224,224",
                             SHAPE_HINT) from None
    if not shape or any(d <= 0 for d in shape):
        raise InputSpecError(f"input shape {text!r} must have at least one dimension, all positive", SHAPE_HINT)
    dtype_key = dtype_text.strip().lower() or "float32"
    if dtype_key not in _DTYPES:
        raise InputSpecError(f"unknown input dtype {dtype_text!r} in {text!r}; known: {', '.join(sorted(_DTYPES))}")
    return InputSpec(shape, _DTYPES[dtype_key])


def make_inputs(specs: list[InputSpec], seed: int, batch: int | None = None) -> tuple[torch.Tensor, ...]:
    """Seeded inputs: standard normal for floating dtypes, small integers otherwise."""
    generator = torch.Generator().manual_seed(seed)
    tensors = []
    for spec in specs:
        spec = spec.with_batch(batch) if batch is not None else spec
        if spec.dtype.is_floating_point:
            t = torch.randn(spec.shape, generator=generator, dtype=torch.float32).to(spec.dtype)
        elif spec.dtype == torch.bool:
            t = torch.randint(0, 2, spec.shape, generator=generator).bool()
        else:
            t = torch.randint(0, 8, spec.shape, generator=generator, dtype=spec.dtype)
        tensors.append(t)
    return tuple(tensors)


def specs_from_tensors(tensors: tuple[torch.Tensor, ...]) -> list[InputSpec]:
    return [InputSpec(tuple(t.shape), t.dtype) for t in tensors]


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run with torch's global RNG seeded, leaving the caller's RNG state as it was.

    Comparisons run both models under the same seed, so a stochastic layer draws the same numbers for both and
    the comparison measures the folding, not the randomness (the audit's determinism probe finds that).
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield
