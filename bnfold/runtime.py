"""Running models: the one place for eval mode, seeding, which inputs are drawn, and the reference outputs.

Conventions (decided here, used by fuse, verify, export and the audit):

* every model runs under ``torch.no_grad()`` with torch's RNG seeded (:func:`bnfold.inputs.seeded`), so a
  stochastic layer draws the same numbers in the reference and in the model compared with it;
* comparison inputs are batch 1 and the given batch: the caller's own example tensors when there are some
  (batch 1 is their first sample), else seeded draws (:func:`bnfold.inputs.make_inputs`); a model with a fixed
  batch is compared at its own batch only;
* the reference outputs are computed once (:class:`Reference`) and shared by every comparison.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from bnfold.compare import Comparison, compare
from bnfold.errors import ModelRunError, first_line
from bnfold.inputs import InputSpec, make_inputs, seeded, specs_from_tensors

__all__ = ["Case", "Reference", "check_parity", "eval_mode", "make_inputs", "parity_inputs", "reference_cases",
           "run_model", "seeded", "split_examples"]


def split_examples(example_inputs: Any) -> tuple[tuple[torch.Tensor, ...] | None, list[InputSpec]]:
    """The caller's example inputs as (their tensors, compared as they are, or None for specs; the specs)."""
    if not example_inputs:
        return None, []
    if isinstance(example_inputs[0], InputSpec):
        return None, list(example_inputs)
    given = tuple(example_inputs)
    return given, specs_from_tensors(given)


def run_model(model: Callable[..., Any], inputs: tuple[Any, ...], seed: int = 0,
              hint: str = "check --input-shape (and its dtype) against what the model expects") -> Any:
    """Run ``model`` without gradients, with the RNG seeded. A model that raises is the user's problem:
    :class:`ModelRunError` with the input shapes and ``hint``."""
    try:
        with torch.no_grad(), seeded(seed):
            return model(*inputs)
    except Exception as exc:  # the user's model raised: report it as a usage problem
        shapes = ", ".join(str(tuple(t.shape)) for t in inputs if isinstance(t, torch.Tensor))
        raise ModelRunError(f"the model failed on inputs of shape {shapes}: {type(exc).__name__}: {first_line(exc)}",
                            hint) from exc


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode for the block and restore every module's own flag afterwards."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, flag in flags:
            module.training = flag


def parity_inputs(specs: list[InputSpec], seed: int, given: tuple[torch.Tensor, ...] | None = None,
                  fixed_batch: bool = False) -> list[tuple[str, tuple[torch.Tensor, ...]]]:
    """Batch 1 and the given batch (when it differs): the caller's own example tensors when given (batch 1 is
    their first sample; token ids and class indices keep their meaning), else seeded draws. A model with a
    fixed batch gets its own batch only."""
    if given and all(isinstance(t, torch.Tensor) and t.dim() > 0 for t in given):
        if fixed_batch:
            return [(f"batch {given[0].shape[0]}", tuple(given))]
        cases = [("batch 1", tuple(t[:1] for t in given))]
        return cases + ([(f"batch {given[0].shape[0]}", tuple(given))] if given[0].shape[0] > 1 else [])
    if not specs or not specs[0].shape:  # no inputs, or a scalar first input: there is no batch axis to vary
        return [("as declared", make_inputs(specs, seed))]
    if fixed_batch:
        return [(f"batch {specs[0].shape[0]}", make_inputs(specs, seed))]
    batches = sorted({1, specs[0].shape[0]})
    return [(f"batch {b}", make_inputs(specs, seed, batch=b)) for b in batches]


@dataclass(frozen=True)
class Case:
    """One comparison input and the reference model's output on it (computed once)."""

    label: str
    inputs: tuple[torch.Tensor, ...]
    expected: Any


def reference_cases(reference: Callable[..., Any], cases: list[tuple[str, tuple[torch.Tensor, ...]]]) -> list[Case]:
    return [Case(label, x, run_model(reference, x)) for label, x in cases]


def check_parity(cases: list[Case], folded: Callable[..., Any], atol, rtol) -> list[Comparison]:
    return [compare(c.label, c.expected, run_model(folded, c.inputs), atol, rtol) for c in cases]


@dataclass(frozen=True)
class Reference:
    """What the eval model computes on the comparison inputs: computed once, compared against by the fold,
    the ONNX export and ``bnfold export``. ``specs`` describe the inputs (for further seeded draws)."""

    specs: list[InputSpec]
    seed: int
    cases: list[Case]
    given: tuple[torch.Tensor, ...] | None = None

    @property
    def largest(self) -> Case:
        """The case at the given batch size (the last one)."""
        return self.cases[-1]


def make_reference(runnable: Callable[..., Any], specs: list[InputSpec], seed: int,
                   given: tuple[torch.Tensor, ...] | None = None, fixed_batch: bool = False) -> Reference:
    return Reference(specs, seed, reference_cases(runnable, parity_inputs(specs, seed, given, fixed_batch)), given)
