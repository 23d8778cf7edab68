"""``bnfold.fuse``: discover, fold, and prove parity with the unfolded eval model.

Data flows one way: discover (which BN folds into what, or why not) -> apply (in float64, on a copy) ->
compare (folded vs unfolded eval model, batch 1 and the given batch) -> :class:`FuseResult`.
The caller's model is never modified.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from bnfold.compare import Comparison, compare
from bnfold.discover import discover, fx, script
from bnfold.discover.graph import Discovery, Fold, Skip, pair, unrecognised
from bnfold.errors import InputSpecError, ModelRunError
from bnfold.fold.apply import CannotFold, GraphHost, KeepStructureHost, ModuleHost, ScriptHost, apply_fold
from bnfold.inputs import SHAPE_HINT, InputSpec, make_inputs, specs_from_tensors


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


def run_model(model: Callable[..., Any], inputs: tuple[Any, ...]) -> Any:
    try:
        with torch.no_grad():
            return model(*inputs)
    except Exception as exc:  # the user's model raised: report it as a usage problem
        shapes = ", ".join(str(tuple(t.shape)) for t in inputs if isinstance(t, torch.Tensor))
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelRunError(f"the model failed on inputs of shape {shapes}: {type(exc).__name__}: {first}",
                            "check --input-shape (and its dtype) against what the model expects") from exc


def parity_inputs(specs: list[InputSpec], seed: int) -> list[tuple[str, tuple[torch.Tensor, ...]]]:
    """Batch 1 and the given batch (when it differs), seeded."""
    batches = sorted({1, specs[0].shape[0] if specs and specs[0].shape else 1})
    return [(f"batch {b}", make_inputs(specs, seed, batch=b)) for b in batches]


def check_parity(reference: Callable[..., Any], folded: Callable[..., Any], cases, atol, rtol) -> list[Comparison]:
    return [compare(label, run_model(reference, x), run_model(folded, x), atol, rtol) for label, x in cases]


@dataclass
class _Target:
    """How one kind of model is folded: what runs, how BNs are found, where the folds are written."""

    reference: Any  # a runnable eval copy; never written to
    discover: Callable[[Any, list[tuple[torch.Tensor, ...]]], Discovery]
    host: type[ModuleHost]
    finish: Callable[[Any, tuple[torch.Tensor, ...]], Any] = lambda model, inputs: model  # noqa: E731
    fixed_shapes: bool = False  # the model only runs at the example shapes (an exported program)


def _stat_paths(model: nn.Module) -> list[str]:
    return [name for name, _ in model.named_buffers() if name.endswith("running_mean")]


def _target(model: Any, method: str, keep_structure: bool) -> _Target:
    if isinstance(model, torch.export.ExportedProgram):
        return _Target(
            reference=model.module(),
            discover=lambda gm, draws: unrecognised(pair(fx.graph_nodes(gm, gm), "export"), _stat_paths(gm)),
            host=GraphHost,
            finish=lambda gm, inputs: torch.export.export(gm, inputs),
            fixed_shapes=True,
        )
    if isinstance(model, torch.jit.ScriptModule):
        reference = copy.deepcopy(model)
        reference.eval()
        return _Target(reference, lambda sm, draws: unrecognised(script.discover(sm, draws[0]), _stat_paths(sm)),
                       ScriptHost)
    if not isinstance(model, nn.Module):
        raise TypeError(f"bnfold.fuse takes an nn.Module, ScriptModule or ExportedProgram, not {type(model).__name__}")
    return _Target(
        reference=copy.deepcopy(model).eval(),
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
    are tensors (their shapes and dtypes are used; the values are regenerated from ``seed``) or
    :class:`~bnfold.inputs.InputSpec` objects. ``method`` picks discovery for ``nn.Module`` models:
    ``"fx"``, ``"observed"`` or ``"auto"`` (fx, falling back to observing forward passes when tracing
    fails). ``keep_structure`` keeps every module and state-dict key (BNs neutralised instead of removed).
    The input model is not modified; ``result.model`` is a folded copy in eval mode.
    """
    specs = list(example_inputs) if example_inputs and isinstance(example_inputs[0], InputSpec) else specs_from_tensors(
        tuple(example_inputs))
    if not specs:
        raise InputSpecError("no example inputs were given", SHAPE_HINT)
    timings: dict[str, float] = {}
    modules = model.module().modules() if isinstance(model, torch.export.ExportedProgram) else model.modules()
    was_training = any(m.training for m in modules)
    target = _target(model, method, keep_structure)
    reference = target.reference
    cases = parity_inputs(specs, seed)
    if target.fixed_shapes:
        cases = [(f"batch {specs[0].shape[0]}", make_inputs(specs, seed))]

    run_model(reference, cases[0][1])  # a model that cannot run on these inputs fails here, with a clear message
    start = time.perf_counter()
    draws = [x for _, x in cases] + [make_inputs(specs, seed + k) for k in (1, 2, 3)]
    draws.append(tuple(-t if t.is_floating_point() else t for t in draws[-1]))  # the other sign, too
    found = target.discover(reference, draws)
    timings["discover"] = time.perf_counter() - start

    start = time.perf_counter()
    folded_model, applied, skipped = _apply(reference, found.folds, target.host)
    timings["fold"] = time.perf_counter() - start
    notes = list(found.notes)

    start = time.perf_counter()
    parity = check_parity(reference, folded_model, cases, atol, rtol)
    if found.method != "fx":
        # Only a static trace proves a fold for every input: check another draw too, and take back any fold
        # that changes the outputs.
        extra = [(f"{label}, seed {seed + 1}", x) for label, x in parity_inputs(specs, seed + 1)]
        extra = extra[-1:] if target.fixed_shapes else extra
        if not all(parity) or not all(check_parity(reference, folded_model, extra, atol, rtol)):
            folded_model, applied, reverted = _revert_failing(reference, applied, cases + extra, atol, rtol,
                                                              target.host)
            skipped += reverted
            notes.append(f"{len(reverted)} fold(s) reverted after numerical checks")
            parity = check_parity(reference, folded_model, cases, atol, rtol)
    timings["compare"] = time.perf_counter() - start

    start = time.perf_counter()
    result_model = target.finish(folded_model, cases[-1][1])
    timings["finish"] = time.perf_counter() - start
    return FuseResult(
        model=result_model,
        folded=applied,
        skipped=skipped + found.skips,
        parity=parity,
        discovery=found.method,
        notes=notes,
        timings=timings,
        was_training=was_training,
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


def _revert_failing(reference: nn.Module, folds: list[Fold], cases, atol, rtol, host_type: type[ModuleHost]):
    """Keep the folds that, one at a time and then together, leave every output within tolerance."""
    kept: list[Fold] = []
    reverted: list[Skip] = []
    for fold in folds:
        candidate, _, _ = _apply(reference, [*kept, fold], host_type)
        results = check_parity(reference, candidate, cases, atol, rtol)
        if all(results):
            kept.append(fold)
        else:
            worst = min(results, key=bool).worst()
            figure = f" (max rel error {worst.max_rel:.2e} in {worst.name})" if worst else ""
            reverted.append(Skip(fold.bn.name, f"reverted: folding into {fold.layer.name} changed the outputs{figure}; "
                                               "the layer's output is probably also used on another code path"))
    model, applied, _ = _apply(reference, kept, host_type)
    return model, applied, reverted
