"""``bnfold.fuse``: discover, fold, and prove parity with the unfolded eval model.

Data flows one way: discover (which BN folds into what, or why not) -> apply (in float64, on a copy) ->
compare (folded vs unfolded eval model, batch 1 and the given batch) -> :class:`FuseResult`.
The caller's model is never modified.
"""

from __future__ import annotations

import contextlib
import copy
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from bnfold.compare import Comparison, compare
from bnfold.discover import discover, fx, script
from bnfold.discover.graph import Discovery, Fold, Skip, pair, unrecognised
from bnfold.errors import InputSpecError, ModelRunError, first_line
from bnfold.fold.apply import CannotFold, GraphHost, KeepStructureHost, ModuleHost, ScriptHost, apply_fold
from bnfold.inputs import SHAPE_HINT, InputSpec, make_inputs, seeded, specs_from_tensors
from bnfold.load import has_static_batch


@dataclass
class FuseResult:
    """What ``fuse`` did. Truthy when the folded model matches the unfolded eval model."""

    model: Any  # the folded model, same kind as the input (nn.Module, ExportedProgram, ScriptModule)
    folded: list[Fold]
    skipped: list[Skip]
    parity: list[Comparison]
    discovery: str
    notes: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    was_training: bool = False

    @property
    def ok(self) -> bool:
        return bool(self.parity) and all(c.ok for c in self.parity)

    def __bool__(self) -> bool:
        return self.ok

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "discovery": self.discovery,
            "was_training": self.was_training,
            "folded": [
                {"bn": f.bn.name, "layer": f.layer.name, "layer_kind": f.layer.kind, "position": f.position}
                for f in self.folded
            ],
            "skipped": [{"bn": s.bn, "reason": s.reason} for s in self.skipped],
            "parity": [c.to_dict() for c in self.parity],
            "notes": list(self.notes),
            "timings": dict(self.timings),
        }


def run_model(model: Callable[..., Any], inputs: tuple[Any, ...], seed: int = 0) -> Any:
    """Run ``model`` without gradients, with the RNG seeded (see :func:`bnfold.inputs.seeded`)."""
    try:
        with torch.no_grad(), seeded(seed):
            return model(*inputs)
    except Exception as exc:  # the user's model raised: report it as a usage problem
        shapes = ", ".join(str(tuple(t.shape)) for t in inputs if isinstance(t, torch.Tensor))
        raise ModelRunError(f"the model failed on inputs of shape {shapes}: {type(exc).__name__}: {first_line(exc)}",
                            "check --input-shape (and its dtype) against what the model expects") from exc


def parity_inputs(specs: list[InputSpec], seed: int, given: tuple[torch.Tensor, ...] | None = None
                  ) -> list[tuple[str, tuple[torch.Tensor, ...]]]:
    """Batch 1 and the given batch (when it differs): the caller's own example tensors when given (batch 1 is
    their first sample; token ids and class indices keep their meaning), else seeded draws."""
    if given and all(isinstance(t, torch.Tensor) and t.dim() > 0 for t in given):
        cases = [("batch 1", tuple(t[:1] for t in given))]
        return cases + ([(f"batch {given[0].shape[0]}", tuple(given))] if given[0].shape[0] > 1 else [])
    batches = sorted({1, specs[0].shape[0] if specs and specs[0].shape else 1})
    return [(f"batch {b}", make_inputs(specs, seed, batch=b)) for b in batches]


@dataclass(frozen=True)
class _Case:
    """One comparison input and the reference model's output on it (computed once)."""

    label: str
    inputs: tuple[torch.Tensor, ...]
    expected: Any


def reference_cases(reference: Callable[..., Any], cases: list[tuple[str, tuple[torch.Tensor, ...]]]) -> list[_Case]:
    return [_Case(label, x, run_model(reference, x)) for label, x in cases]


def check_parity(cases: list[_Case], folded: Callable[..., Any], atol, rtol) -> list[Comparison]:
    return [compare(c.label, c.expected, run_model(folded, c.inputs), atol, rtol) for c in cases]


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


@dataclass
class _Target:
    """How one kind of model is folded: what runs, how BNs are found, where the folds are written."""

    reference: Any  # the runnable model in eval mode; never written to
    discover: Callable[[Any, list[tuple[torch.Tensor, ...]]], Discovery]
    host: type[ModuleHost]
    finish: Callable[[Any, tuple[torch.Tensor, ...]], Any] = lambda model, inputs: model  # noqa: E731
    fixed_shapes: bool = False  # the model only runs at the example batch size (an exported program)
    has_modes: bool = True  # train()/eval() apply (an exported program's mode is baked into its graph)


def _stat_paths(model: nn.Module) -> list[str]:
    return [name for name, _ in model.named_buffers() if name.endswith("running_mean")]


def _target(model: Any, method: str, keep_structure: bool) -> _Target:
    if isinstance(model, torch.export.ExportedProgram):
        return _Target(
            reference=model.module(),
            discover=lambda gm, draws: unrecognised(pair(fx.graph_nodes(gm, gm), "export"), _stat_paths(gm)),
            host=GraphHost,
            finish=lambda gm, inputs: torch.export.export(gm, inputs),
            fixed_shapes=has_static_batch(model),
            has_modes=False,
        )
    if isinstance(model, torch.jit.ScriptModule):
        return _Target(model, lambda sm, draws: unrecognised(script.discover(sm, draws[0]), _stat_paths(sm)),
                       ScriptHost)
    if not isinstance(model, nn.Module):
        raise TypeError(f"bnfold.fuse takes an nn.Module, ScriptModule or ExportedProgram, not {type(model).__name__}")
    return _Target(
        reference=model,
        discover=lambda m, draws: discover(m, draws, method=method),
        host=KeepStructureHost if keep_structure else ModuleHost,
    )


def fuse(
    model: Any,
    example_inputs: tuple[torch.Tensor, ...] | list[InputSpec],
    *,
    atol: float | None = None,
    rtol: float | None = None,
    seed: int = 0,
    method: str = "auto",
    keep_structure: bool = False,
) -> FuseResult:
    """Fold every BatchNorm of ``model`` that can be folded and prove the result matches.

    ``model`` is an ``nn.Module``, a TorchScript module or a ``torch.export`` program. ``example_inputs``
    are tensors (compared as they are, batch 1 being their first sample; further draws for discovery are
    seeded, integers within the range of the given values) or :class:`~bnfold.inputs.InputSpec` objects. ``method`` picks discovery for ``nn.Module`` models:
    ``"fx"``, ``"observed"`` or ``"auto"`` (fx, falling back to observing forward passes when tracing
    fails). ``keep_structure`` keeps every module and state-dict key (BNs neutralised instead of removed).
    The input model is not modified; ``result.model`` is a folded copy in eval mode.
    """
    given = None if not example_inputs or isinstance(example_inputs[0], InputSpec) else tuple(example_inputs)
    specs = specs_from_tensors(given) if given else list(example_inputs or ())
    if not specs:
        raise InputSpecError("no example inputs were given", SHAPE_HINT)
    target = _target(model, method, keep_structure)
    # An exported program's mode is baked into its graph (its GraphModule always reports training=True).
    was_training = target.has_modes and any(m.training for m in target.reference.modules())
    # The caller's model is the reference (no copy: peak memory stays near one extra model); eval_mode
    # restores its train/eval flags afterwards and nothing writes to it.
    with eval_mode(target.reference) if target.has_modes else contextlib.nullcontext(target.reference) as reference:
        result = _fuse(target, reference, specs, atol, rtol, seed, given)
    result.was_training = was_training
    return result


def _fuse(target: _Target, reference: Any, specs: list[InputSpec], atol, rtol, seed: int,
          given: tuple[torch.Tensor, ...] | None) -> FuseResult:
    timings: dict[str, float] = {}
    inputs = parity_inputs(specs, seed, given)
    if target.fixed_shapes:
        inputs = [(f"batch {specs[0].shape[0]}", given or make_inputs(specs, seed))]
    cases = reference_cases(reference, inputs)  # a model that cannot run on these inputs fails here, clearly

    start = time.perf_counter()
    draws = [c.inputs for c in cases] + [make_inputs(specs, seed + k) for k in (1, 2, 3)]
    draws.append(tuple(-t if t.is_floating_point() else t for t in draws[-1]))  # the other sign, too
    found = target.discover(reference, draws)
    timings["discover"] = time.perf_counter() - start

    start = time.perf_counter()
    folded_model, applied, skipped = _apply(reference, found.folds, target.host)
    timings["fold"] = time.perf_counter() - start
    notes = list(found.notes)

    start = time.perf_counter()
    parity = check_parity(cases, folded_model, atol, rtol)
    if found.method != "fx":
        # Only a static trace proves a fold for every input: check another draw too, and take back any fold
        # that changes the outputs.
        extra_inputs = [(f"{label}, seed {seed + 1}", x) for label, x in parity_inputs(specs, seed + 1)]
        extra = reference_cases(reference, extra_inputs[-1:] if target.fixed_shapes else extra_inputs)
        if not all(parity) or not all(check_parity(extra, folded_model, atol, rtol)):
            folded_model, applied, reverted = _revert_failing(reference, applied, cases + extra, atol, rtol,
                                                              target.host)
            skipped += reverted
            notes.append(f"{len(reverted)} fold(s) reverted after numerical checks")
            parity = check_parity(cases, folded_model, atol, rtol)
    timings["compare"] = time.perf_counter() - start

    start = time.perf_counter()
    result_model = target.finish(folded_model, cases[-1].inputs)
    timings["finish"] = time.perf_counter() - start
    return FuseResult(
        model=result_model,
        folded=applied,
        skipped=skipped + found.skips,
        parity=parity,
        discovery=found.method,
        notes=notes,
        timings=timings,
    )


def _apply(reference: nn.Module, folds: list[Fold], host_type: type[ModuleHost]):
    """Apply ``folds`` to a copy of ``reference``; a fold whose tensors refuse becomes a skip."""
    model = copy.deepcopy(reference)
    host = host_type(model)
    applied, skipped = [], []
    for fold in folds:
        try:
            apply_fold(host, fold)
            applied.append(fold)
        except CannotFold as exc:
            skipped.append(Skip(fold.bn.name, str(exc)))
    return model.eval(), applied, skipped


def _revert_failing(reference: nn.Module, folds: list[Fold], cases: list[_Case], atol, rtol,
                    host_type: type[ModuleHost]):
    """Keep the folds that, one at a time and then together, leave every output within tolerance."""
    kept: list[Fold] = []
    reverted: list[Skip] = []
    for fold in folds:
        candidate, _, _ = _apply(reference, [*kept, fold], host_type)
        results = check_parity(cases, candidate, atol, rtol)
        if all(results):
            kept.append(fold)
        else:
            worst = min(results, key=bool).worst()
            figure = f" ({worst.figure()})" if worst else ""
            reverted.append(Skip(fold.bn.name, f"reverted: folding into {fold.layer.name} changed the outputs{figure}; "
                                               "the layer's output is probably also used on another code path"))
    model, applied, _ = _apply(reference, kept, host_type)
    return model, applied, reverted
