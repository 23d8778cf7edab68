"""``bnfold inspect``: every BatchNorm of a model, its fold plan, its statistics and their risks. No verdict.

Each figure has one source, so that nothing means two things:

* the plan is :func:`bnfold.fuse.plan`, the plan ``bnfold fuse`` applies (for ONNX, the adapter's
  :func:`~bnfold.onnx.fold.discover_graph`), and the producer and consumers are those :func:`bnfold.discover.graph.pair`
  saw while pairing;
* the statistics are read by the BN's tensor paths through the tensor host of the model's kind (the module,
  TorchScript and ``.pt2`` hosts of :mod:`bnfold.kinds`; :class:`~bnfold.onnx.graph.OnnxHost` for the
  initializers of an ONNX graph), and reduced in float64 by :func:`figures`;
* the drift against ``data`` is :func:`bnfold.recalibrate.recalibrate`'s (the computation behind BN013), for eager
  models only.

Per BN with running statistics, channel ``c`` (``gamma = 1`` when ``affine=False``): the *magnification*
``|gamma_c| / sqrt(var_c + eps)`` is what folding multiplies the layer's weights by along channel ``c`` (its
range is taken over the channels that are not dead); a *dead* channel has ``gamma_c == 0`` (its output is the constant
``beta_c`` whatever the input).

Caveats for the caller:
1. ``inspect`` judges nothing: the report has no truth value (``bnfold.verify`` is the pass/fail gate). Risk flags
   (:data:`FLAGS`) mark what deserves a look.
2. A BN that no batch-norm op reads in a compiled graph (a FrozenBatchNorm-style module in a ``.pt2`` or TorchScript
   graph) and a BatchNormalization inside an ONNX subgraph get a row (after the others) with the plan's reason and
   no figures.
3. ``momentum`` is read from eager modules only (``None`` elsewhere, and for ``momentum=None``, the cumulative
   average); ``num_batches_tracked`` wherever the tensor exists beside ``running_mean`` (never in ONNX).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from bnfold.audit import DEGENERATE_SCALE, all_modules
from bnfold.data import load_data
from bnfold.discover.graph import Discovery, Fold
from bnfold.fold.apply import CannotFold
from bnfold.fuse import plan
from bnfold.inputs import InputSpec
from bnfold.kinds import Adapter, adapter_for
from bnfold.layers import BNRef, is_bn_module
from bnfold.recalibrate import LayerDrift, recalibrate

#: float16's largest finite value: a running variance above it is infinite in a float16 model.
FP16_MAX = float(torch.finfo(torch.float16).max)

#: Risk flags (API: the JSON's ``flags`` and the table's "risk" column), each with what it means.
FLAGS: dict[str, str] = {
    "magnification": f"folding magnifies weights by more than {DEGENERATE_SCALE:g} (float16/int8 risk; BN006)",
    "fp16_variance": f"running variance above the float16 maximum {FP16_MAX:g}: infinite in a float16 model",
    "never_learned": "running statistics never learned or not loaded: mean all 0, variance all 1, "
                     "num_batches_tracked 0 or absent (BN004)",
    "batch_statistics": "track_running_stats=False (or no running statistics): normalises with batch statistics "
                        "in eval (BN003)",
    "training_mode": "ONNX BatchNormalization with training_mode=1: batch statistics at inference (BN009)",
    "non_finite": "NaN/Inf in the running statistics or affine parameters (BN005)",
}


@dataclass(frozen=True)
class Figures:
    """One BN's statistics, reduced in float64 (see the module docstring)."""

    channels: int
    mean_min: float
    mean_max: float
    var_min: float
    var_max: float
    gamma_min: float | None  # None when the BN is not affine
    gamma_max: float | None
    magnification_min: float | None  # over the channels that are not dead; None when every channel is
    magnification_max: float
    magnification_channel: int  # where the largest magnification is
    dead_channels: int  # gamma == 0
    untouched: bool  # mean all 0 and variance all 1, as a fresh BN has them
    finite: bool  # statistics and affine parameters all finite


def figures(mean: torch.Tensor, var: torch.Tensor, eps: float, gamma: torch.Tensor | None = None,
            beta: torch.Tensor | None = None) -> Figures:
    """Reduce one BN's tensors (any dtype; computed in float64). Pure: tensors in, numbers out."""
    mean, var = mean.detach().double().flatten(), var.detach().double().flatten()
    gamma = gamma.detach().double().flatten() if gamma is not None else None
    finite = all(bool(torch.isfinite(t).all()) for t in (mean, var, gamma, beta) if t is not None)
    scale = (gamma.abs() if gamma is not None else torch.ones_like(var)) / torch.sqrt(var + eps)
    worst = int(torch.argmax(scale))
    live = scale[gamma != 0] if gamma is not None else scale
    return Figures(
        channels=mean.numel(),
        mean_min=mean.min().item(), mean_max=mean.max().item(),
        var_min=var.min().item(), var_max=var.max().item(),
        gamma_min=gamma.min().item() if gamma is not None else None,
        gamma_max=gamma.max().item() if gamma is not None else None,
        magnification_min=live.min().item() if live.numel() else None, magnification_max=scale[worst].item(),
        magnification_channel=worst,
        dead_channels=int((gamma == 0).sum()) if gamma is not None else 0,
        untouched=bool((mean == 0).all() and (var == 1).all()),
        finite=finite,
    )


def risk_flags(fig: Figures | None, tracked: int | None, batch_stats: bool, in_graph: bool) -> list[str]:
    """The :data:`FLAGS` that apply to one BN, in the registry's order. ``in_graph``: an ONNX graph, where batch
    statistics are the node's ``training_mode``."""
    found = {
        "magnification": fig is not None and fig.magnification_max > DEGENERATE_SCALE,
        "fp16_variance": fig is not None and fig.var_max > FP16_MAX,
        "never_learned": fig is not None and fig.untouched and not tracked,
        "batch_statistics": batch_stats and not in_graph,
        "training_mode": batch_stats and in_graph,
        "non_finite": fig is not None and not fig.finite,
    }
    return [code for code in FLAGS if found[code]]


@dataclass
class BNRow:
    """One BatchNorm: where it sits, what the plan does with it, its figures and flags."""

    name: str  # module path, or ONNX node name
    producer: str | None  # label of what feeds it ("(input)": a model input); None when discovery saw no dataflow
    consumers: list[str]  # labels of what reads it ("(output)": the model output)
    fold: Fold | None  # the plan's fold, None when the BN is left
    reason: str | None  # why it is left (None when it folds)
    code: str | None = None  # the reason's code (:data:`bnfold.discover.reasons.CODES`; None when it folds)
    merged_with: list[str] = field(default_factory=list)  # other BNs folding into the same layer
    eps: float | None = None
    momentum: float | None = None
    num_batches_tracked: int | None = None
    figures: Figures | None = None
    flags: list[str] = field(default_factory=list)
    drift: LayerDrift | None = None
    note: str | None = None  # why the figures are missing

    @property
    def folds(self) -> bool:
        return self.fold is not None

    def to_dict(self) -> dict[str, Any]:
        fig = self.figures
        fold = self.fold
        return {
            "name": self.name, "producer": self.producer, "consumers": list(self.consumers),
            "status": "folds" if fold else "left",
            "layer": fold.layer.name if fold else None, "layer_kind": fold.layer.kind if fold else None,
            "position": fold.position if fold else None, "merged_with": list(self.merged_with),
            "plan": fold.describe() if fold else None,
            "reason": self.reason,
            "channels": fig.channels if fig else None, "eps": self.eps, "momentum": self.momentum,
            "num_batches_tracked": self.num_batches_tracked,
            "running_mean_min": fig.mean_min if fig else None, "running_mean_max": fig.mean_max if fig else None,
            "running_var_min": fig.var_min if fig else None, "running_var_max": fig.var_max if fig else None,
            "gamma_min": fig.gamma_min if fig else None, "gamma_max": fig.gamma_max if fig else None,
            "magnification_min": fig.magnification_min if fig else None,
            "magnification_max": fig.magnification_max if fig else None,
            "magnification_channel": fig.magnification_channel if fig else None,
            "dead_channels": fig.dead_channels if fig else None,
            "flags": list(self.flags),
            "drift": _drift_dict(self.drift),
            "note": self.note,
        }


def _drift_dict(drift: LayerDrift | None) -> dict[str, Any] | None:
    if drift is None:
        return None
    return {"samples": drift.samples, "mean_shift": drift.mean_shift, "var_ratio": drift.var_ratio}


@dataclass(frozen=True)
class InspectSummary:
    bns: int
    foldable: int
    left: dict[str, int]  # reason code (:data:`bnfold.discover.reasons.CODES`) -> BNs left for it, most first
    risky: int  # BNs with at least one flag

    def to_dict(self) -> dict[str, Any]:
        return {"bns": self.bns, "foldable": self.foldable, "left": dict(self.left), "risky": self.risky}


@dataclass
class InspectReport:
    """Every BN in forward order. Deliberately without a truth value: ``inspect`` never judges."""

    kind: str  # the model kind: module, torchscript, export, onnx
    discovery: str  # the plan's front-end: fx, observed, export, torchscript, onnx
    rows: list[BNRow]
    drift: list[LayerDrift] | None = None  # worst first; None without data
    drift_samples: int = 0  # inputs the drift was measured on
    notes: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        raise TypeError("an InspectReport has no verdict: bnfold.verify is the pass/fail check")

    @property
    def summary(self) -> InspectSummary:
        left = Counter(r.code or "unclassified" for r in self.rows if not r.folds)
        return InspectSummary(bns=len(self.rows), foldable=sum(r.folds for r in self.rows),
                              left=dict(left.most_common()), risky=sum(bool(r.flags) for r in self.rows))

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "discovery": self.discovery,
            "summary": self.summary.to_dict(),
            "flags": {code: FLAGS[code] for code in FLAGS},
            "bns": [r.to_dict() for r in self.rows],
            "drift": None if self.drift is None else {
                "samples": self.drift_samples, "layers": [d.to_dict() for d in self.drift]},
            "notes": list(self.notes),
        }


def inspect(model: Any, example_inputs: tuple[torch.Tensor, ...] | list[InputSpec] | None = None, *,
            data: Any = None, samples: int | None = 4096) -> InspectReport:
    """Describe every BatchNorm of ``model``: plan, statistics, risks, and with ``data`` the drift.

    ``model`` is any kind bnfold reads (nn.Module, ScriptModule, ExportedProgram, onnx.ModelProto);
    ``example_inputs`` are as for :func:`bnfold.fuse` (not needed for ``.pt2`` programs and ONNX graphs).
    ``data`` is what :func:`bnfold.recalibrate.recalibrate` takes (batches, or a callable returning them) or a
    ``--data`` spec string; ``samples`` caps the inputs it reads. The model is not modified.
    """
    adapter = adapter_for(model)
    found = plan(adapter, example_inputs)
    host = adapter.tensor_host()
    notes = list(found.notes)
    rows = [_row(ref, found.neighbours.get(ref.name), found, host, adapter) for ref in found.bns]
    known = {r.name for r in rows}
    rows += [BNRow(s.bn, None, [], None, s.reason, s.code,
                   note="statistics not read: no BN op of the main graph reads them")
             for s in found.skips if s.bn not in known]
    _mark_merges(rows)
    notes += _unseen_modules(adapter, {r.name for r in rows})
    notes += [f"affine tail {' -> '.join(s.label for s in tail.ops)} ({' -> '.join(s.op for s in tail.ops)}) after "
              f"{layer}: folds into {layer}" for layer, tail in found.tails.items() if tail.removes]
    report = InspectReport(adapter.kind, found.method, rows, notes=notes)
    if data is not None:
        _add_drift(report, adapter, data, samples)
    return report


def _row(ref: BNRef, neighbours: tuple[str, list[str]] | None, found: Discovery, host: Any,
         adapter: Adapter) -> BNRow:
    fold = next((f for f in found.folds if f.bn.name == ref.name), None)
    skip = next((s for s in found.skips if s.bn == ref.name), None)
    producer, consumers = neighbours or (None, [])
    row = BNRow(ref.name, producer, list(consumers), fold, skip.reason if skip else None, skip.code if skip else None,
                eps=ref.eps, momentum=_momentum(ref, adapter))
    if ref.mean is None or ref.var is None:
        row.note = "no running statistics"
    else:
        row.num_batches_tracked = _tracked(ref.mean, host, adapter)
        try:
            row.figures = _read_figures(ref, host)
        except (AttributeError, KeyError, CannotFold, RuntimeError) as exc:  # e.g. a parameter fed at run time
            row.note = f"statistics not read: {exc}"
    row.flags = risk_flags(row.figures, row.num_batches_tracked, ref.batch_stats,
                           adapter.runs_in_onnxruntime)
    return row


def _read_figures(ref: BNRef, host: Any) -> Figures | None:
    tensors = [host.get(path) if path else None for path in (ref.mean, ref.var, ref.weight, ref.bias)]
    if tensors[0].numel() == 0:
        return None
    return figures(tensors[0], tensors[1], ref.eps, tensors[2], tensors[3])


def _momentum(ref: BNRef, adapter: Adapter) -> float | None:
    if not adapter.eager or ref.module is None:
        return None
    momentum = getattr(adapter.model.get_submodule(ref.module), "momentum", None)
    return float(momentum) if isinstance(momentum, (int, float)) else None


def _tracked(mean_path: str, host: Any, adapter: Adapter) -> int | None:
    """``num_batches_tracked`` beside ``running_mean``, where the kind keeps it (not ONNX)."""
    if adapter.runs_in_onnxruntime:
        return None
    owner = mean_path.rpartition(".")[0]
    try:
        return int(host.get(f"{owner}.num_batches_tracked" if owner else "num_batches_tracked"))
    except (AttributeError, KeyError, RuntimeError, TypeError, ValueError):
        return None


def _mark_merges(rows: list[BNRow]) -> None:
    """A layer that absorbs several BNs (BN -> conv -> BN) merges them: each row names the others."""
    by_layer: dict[str, list[str]] = {}
    for row in rows:
        if row.fold is not None:
            by_layer.setdefault(row.fold.layer.name, []).append(row.name)
    for row in rows:
        if row.fold is not None:
            row.merged_with = [n for n in by_layer[row.fold.layer.name] if n != row.name]


def _unseen_modules(adapter: Adapter, names: set[str]) -> list[str]:
    """BN modules of an eager model that discovery did not see (never called, or called outside the registered
    modules): not in the plan, so not in the table."""
    if not adapter.eager:
        return []
    unseen = [n for n, m in all_modules(adapter.model).items() if is_bn_module(m) and n not in names]
    if not unseen:
        return []
    listed = ", ".join(unseen[:5]) + (", ..." if len(unseen) > 5 else "")
    note = (f"{len(unseen)} BN module(s) not in the plan (the forward pass does not call them where discovery sees "
            f"it): {listed}")
    return [note]


def _add_drift(report: InspectReport, adapter: Adapter, data: Any, samples: int | None) -> None:
    """Drift of each BN's running statistics from the data's population statistics (recalibrate's, as BN013)."""
    if not adapter.eager:
        report.notes.append("--data needs the eager model (a state dict with --arch, or a pickled module): drift was "
                            "not computed")
        return
    model: nn.Module = adapter.model
    if isinstance(data, str):
        dtype = next((p.dtype for p in model.parameters()), torch.float32)
        data = load_data(data, dtype=dtype)
    result = recalibrate(model, data, samples=samples)
    report.drift = sorted(result.layers, key=lambda d: d.score, reverse=True)
    report.drift_samples = result.samples
    by_name = {d.name: d for d in result.layers}
    for row in report.rows:
        row.drift = by_name.get(row.name)
    report.notes += [f"drift of {name} not measured: {reason}" for name, reason in result.skipped]
