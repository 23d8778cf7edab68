"""Fold a torch model and prove it: the algorithm behind :func:`bnfold.fuse.fuse` for the kinds that run in PyTorch.

Data flows one way: discover (which BN folds into what, or why not; the adapter's own discovery) -> apply (in
float64, on a copy, through the adapter's host) -> compare (folded vs unfolded eval model, batch 1 and the given
batch) -> :class:`~bnfold.fold.result.FuseResult`. The caller's model is never modified. ``adapter`` is a torch
kind's adapter (:mod:`bnfold.kinds`); this module needs only what every adapter answers.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from typing import Any

import torch
from torch import nn

from bnfold.discover.graph import Discovery, Fold, Skip
from bnfold.fold.apply import TensorHost, apply_plan
from bnfold.fold.result import FuseResult
from bnfold.inputs import InputSpec, make_inputs
from bnfold.runtime import Case, Reference, check_parity, make_reference, parity_inputs, reference_cases


def fuse_torch(adapter: Any, given: tuple[torch.Tensor, ...] | None, specs: list[InputSpec], *, atol: float | None,
               rtol: float | None, seed: int, reference: Reference | None = None) -> FuseResult:
    """Fold a copy of ``adapter``'s model and compare it with the eval model (``reference``, when the caller
    computed it already)."""
    was_training = adapter.was_training()
    # The caller's model is the reference (no copy: peak memory stays near one extra model); evaluating()
    # restores its train/eval flags afterwards and nothing writes to it.
    with adapter.evaluating() as runnable:
        if reference is None:
            reference = make_reference(runnable, specs, seed, given, adapter.fixed_batch)
        result = _fuse(adapter, runnable, reference, atol, rtol)
    result.was_training = was_training
    return result


def plan_torch(adapter: Any, given: tuple[torch.Tensor, ...] | None, specs: list[InputSpec], seed: int) -> Discovery:
    """What :func:`fuse_torch` would apply, from the same draws."""
    with adapter.evaluating() as runnable:
        reference = make_reference(runnable, specs, seed, given, adapter.fixed_batch)
        return adapter.discover(runnable, _draws(reference.cases, specs, seed))


def _fuse(adapter: Any, runnable: Any, reference: Reference, atol, rtol) -> FuseResult:
    timings: dict[str, float] = {}
    specs, seed, cases = reference.specs, reference.seed, reference.cases

    start = time.perf_counter()
    found = adapter.discover(runnable, _draws(cases, specs, seed))
    timings["discover"] = time.perf_counter() - start

    start = time.perf_counter()
    folded_model, applied, skipped = _apply(runnable, found, adapter.host)
    timings["fold"] = time.perf_counter() - start
    notes = list(found.notes) + found.merge_notes()

    start = time.perf_counter()
    parity = check_parity(cases, folded_model, atol, rtol)
    if found.method != "fx":
        # Only a static trace proves a fold for every input: check another draw too, and take back any fold
        # that changes the outputs.
        extra_inputs = [(f"{label}, seed {seed + 1}", x)
                        for label, x in parity_inputs(specs, seed + 1, fixed_batch=adapter.fixed_batch)]
        extra = reference_cases(runnable, extra_inputs)
        if not all(parity) or not all(check_parity(extra, folded_model, atol, rtol)):
            folded_model, applied, reverted = _revert_failing(runnable, applied, cases + extra, atol, rtol,
                                                              adapter.host)
            skipped += reverted
            notes.append(f"{len(reverted)} fold(s) reverted after numerical checks")
            parity = check_parity(cases, folded_model, atol, rtol)
    timings["compare"] = time.perf_counter() - start

    start = time.perf_counter()
    result_model = adapter.finish(folded_model, cases[-1].inputs)
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


def _draws(cases: list[Case], specs: list[InputSpec], seed: int) -> list[tuple[torch.Tensor, ...]]:
    """What discovery runs (observed discovery needs both sides of data-dependent branches): the comparison
    inputs, three more seeded draws, and the last one negated."""
    draws = [c.inputs for c in cases] + [make_inputs(specs, seed + k) for k in (1, 2, 3)]
    draws.append(tuple(-t if t.is_floating_point() else t for t in draws[-1]))
    return draws


def _apply(reference: nn.Module, plan: Discovery | list[Fold], host_type: type[TensorHost]):
    """Apply ``plan`` to a copy of ``reference``; a fold whose tensors refuse becomes a skip.

    Some folds rewrite the forward (a merge of branches; a bias for a functional conv that has none): when the
    plan holds one, the host may rewrite graphs, and discovery traced ``reference``, the copy is of that
    traced graph, and the folded model is a ``torch.fx.GraphModule``.
    """
    folds, merges = (plan.folds, plan.merges) if isinstance(plan, Discovery) else (plan, [])
    graph = plan.graph if isinstance(plan, Discovery) and host_type.rewrites else None
    rewrite = merges or any(f.merge is not None or any(layer.module is None and layer.bias is None
                                                       for layer in f.layers) for f in folds)
    model = copy.deepcopy(graph if graph is not None and rewrite else reference)
    applied, skipped = apply_plan(host_type(model), folds, merges)
    return model.eval(), applied, skipped


def _revert_failing(reference: nn.Module, folds: list[Fold], cases: list[Case], atol, rtol,
                    host_type: type[TensorHost]):
    """Keep the folds that, one at a time and then together, leave every output within tolerance."""
    kept: list[Fold] = []
    reverted: list[Skip] = []
    for fold in folds:
        # A layer given a bias through its module may not read it (a functional call passing None): then the BN
        # can still keep the shift (z + shift), so that is tried before giving up.
        attempts = [fold]
        if fold.layer.module is not None and fold.layer.bias is None and not fold.parts:
            attempts.append(dataclasses.replace(fold, layer=dataclasses.replace(fold.layer, module=None)))
        for attempt in attempts:
            candidate, _, _ = _apply(reference, [*kept, attempt], host_type)
            results = check_parity(cases, candidate, atol, rtol)
            if all(results):
                kept.append(attempt)
                break
        else:
            worst = min(results, key=bool).worst()
            figure = f" ({worst.figure()})" if worst else ""
            reverted.append(Skip(fold.bn.name, f"reverted: folding into {fold.layer.name} changed the outputs{figure}; "
                                               "the layer's output is probably also used on another code path", "reverted"))
    model, applied, _ = _apply(reference, kept, host_type)
    return model, applied, reverted
