"""Precise BatchNorm: replace running statistics by population statistics of the data.

Why: the running statistics are an exponential (``momentum=0.1``) or cumulative (``momentum=None``) average
of *batch* statistics gathered while the weights were still moving, so they lag the final weights, and an
average of per-batch variances misses the variance *between* batch means. Wu & Johnson ("Rethinking 'Batch'
in BatchNorm", 2021) re-estimate them with the model frozen on 10^3 to 10^4 samples.

How (decided, measured in ``docs/training.md``): **layer by layer in eval mode** by default. For the k-th BN
(in forward order) the whole model runs in eval mode, the BNs before it already recalibrated, and a hook
accumulates per-channel ``n``, ``sum x`` and ``sum x^2`` of its *input* in float64 over every sample; the
exact population mean and variance follow. Each layer sees exactly what it will see at inference, at the cost
of one pass over the data per BN. ``method="global"`` is the one-pass alternative used by fvcore and AIMET:
all BNs normalise with batch statistics while every BN's input is accumulated; later layers then see inputs
normalised with batch statistics, not the final population statistics.

Caveats for the caller:
1. The model is frozen: no parameter changes, dropout stays off, momentum and ``num_batches_tracked`` are
   left as they were; only ``running_mean``/``running_var`` change (``running_var`` is stored unbiased,
   ``n/(n-1)`` times the population variance, as PyTorch's own update does).
2. Under ``torchrun`` (``torch.distributed`` initialised) each process feeds its own shard; the sums are
   all-reduced, so every process ends with the statistics of the union, equal to a single-process run.
3. BNs without running statistics (``track_running_stats=False``) or not reached by the data are reported,
   not changed.
4. The data must be finite and non-empty, and the new statistics finite: anything else raises (naming the
   sample or the BN) rather than writing NaN statistics. A one-shot iterator (a generator) cannot be passed
   over once per BN: with ``samples`` its first ``samples`` inputs are read into memory, without it is refused.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from bnfold.audit import all_modules
from bnfold.compare import compare
from bnfold.errors import BnfoldError, DataError, ModelRunError
from bnfold.inputs import dtype_name
from bnfold.runtime import eval_mode, run_model

Method = Literal["layerwise", "global"]


@dataclass(frozen=True)
class LayerDrift:
    """How far one BN's old statistics were from the population statistics of the data."""

    name: str
    samples: int  # values per channel that entered the estimate (batch x spatial positions)
    mean_shift: float  # max over channels of |old mean - new mean| / sqrt(new var + eps)
    var_ratio: float  # max over channels of max(old/new, new/old) of (var + eps)

    @property
    def score(self) -> float:
        """One number to rank layers by: a mean shift in standard deviations, or a log variance ratio."""
        return max(self.mean_shift, math.log(self.var_ratio))

    def to_dict(self) -> dict[str, Any]:
        return {"bn": self.name, "samples": self.samples, "mean_shift": self.mean_shift, "var_ratio": self.var_ratio}


@dataclass
class RecalibrationResult:
    model: nn.Module
    layers: list[LayerDrift]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (bn, reason)
    samples: int = 0  # inputs seen (all processes together)
    output_change: float | None = None  # max rel change of the outputs on the first batch
    method: Method = "layerwise"

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "samples": self.samples, "output_change": self.output_change,
                "layers": [d.to_dict() for d in self.layers],
                "skipped": [{"bn": b, "reason": r} for b, r in self.skipped]}


class _Moments:
    """Per-channel float64 count, sum and sum of squares of a BN's input (channel axis 1)."""

    def __init__(self) -> None:
        self.n = 0
        self.s1: torch.Tensor | None = None
        self.s2: torch.Tensor | None = None

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().to(torch.float64).transpose(0, 1).reshape(x.shape[1], -1)
        s1, s2 = x.sum(1), (x * x).sum(1)
        self.s1 = s1 if self.s1 is None else self.s1 + s1
        self.s2 = s2 if self.s2 is None else self.s2 + s2
        self.n += x.shape[1]

    def all_reduce(self) -> None:
        if not _distributed():
            return
        import torch.distributed as dist

        packed = torch.cat([torch.tensor([float(self.n)], dtype=torch.float64), self.s1, self.s2])
        dist.all_reduce(packed)
        c = self.s1.numel()
        self.n, self.s1, self.s2 = int(packed[0].item()), packed[1:1 + c], packed[1 + c:]

    def mean_var(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Population mean and *unbiased* variance (PyTorch's running_var convention)."""
        mean = self.s1 / self.n
        biased = (self.s2 / self.n - mean * mean).clamp_min(0.0)
        return mean, biased * self.n / max(self.n - 1, 1)


def _distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _as_inputs(batch: Any) -> tuple[torch.Tensor, ...]:
    """A batch is a tensor, or a tuple/list whose first element(s) are the inputs (labels are ignored)."""
    if isinstance(batch, dict):
        inputs = tuple(v for v in batch.values() if isinstance(v, torch.Tensor))[:1]
    elif isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        inputs = (batch[0],)
    else:
        inputs = (batch,) if isinstance(batch, torch.Tensor) else ()
    if not inputs:
        raise DataError(f"a calibration batch must be a tensor or a tuple (inputs, ...), got {_describe(batch)}",
                        "yield tensors or (inputs, labels) tuples; convert arrays with torch.from_numpy")
    if inputs[0].ndim == 0:
        raise DataError("a calibration batch is a 0-d tensor: batches need a batch dimension",
                        "yield batches shaped (N, ...) as the model takes them, e.g. x.split(64)")
    return inputs


def _describe(batch: Any) -> str:
    if isinstance(batch, (tuple, list, dict)):
        kinds = ", ".join(type(v).__name__ for v in (batch.values() if isinstance(batch, dict) else batch))
        return f"a {type(batch).__name__} of ({kinds})"
    return type(batch).__name__


def _limited(batches: Iterable[Any], samples: int | None) -> Iterator[tuple[torch.Tensor, ...]]:
    """The inputs of each batch, ``samples`` of them in all; empty batches are skipped, non-finite ones refused.

    Stops as soon as ``samples`` inputs were yielded, so an endless generator is not read one batch too far.
    """
    seen = 0
    for batch in batches:
        inputs = _as_inputs(batch)
        if samples is not None:
            inputs = tuple(t[: samples - seen] for t in inputs)
        if inputs[0].shape[0] == 0:
            continue
        _refuse_non_finite(inputs, seen)
        seen += inputs[0].shape[0]
        yield inputs
        if samples is not None and seen >= samples:
            return


def _refuse_non_finite(inputs: tuple[torch.Tensor, ...], first_index: int) -> None:
    """One NaN/inf input would make every statistic NaN: name the first bad sample (counted over the data)."""
    for t in inputs:
        if not t.is_floating_point():
            continue
        finite = torch.isfinite(t.reshape(t.shape[0], -1)).all(1)
        if bool(finite.all()):
            continue
        row = int((~finite).nonzero()[0])
        values = "NaN" if bool(torch.isnan(t[row]).any()) else "inf"
        raise DataError(f"calibration sample {first_index + row} has {values} values",
                        "drop or repair non-finite inputs before calibrating (np.isfinite finds them)")


def _passes(batches: Any, samples: int | None) -> Callable[[], Iterable[Any]]:
    """A callable returning a fresh iterable of the batches: the layer-by-layer method passes once per BN."""
    if isinstance(batches, torch.Tensor):
        raise DataError(f"batches is one tensor of shape {tuple(batches.shape)}, not an iterable of batches",
                        "split it into batches: x.split(64), or pass [x]")
    if callable(batches):
        return _fresh_calls(batches)
    if not isinstance(batches, Iterable):
        raise DataError(f"batches must be an iterable of batches or a callable returning one, "
                        f"got {type(batches).__name__}", "pass a list of tensors or a DataLoader")
    if not _one_shot(batches):
        return lambda: batches
    if samples is None:
        raise DataError(f"the calibration batches are a one-shot {type(batches).__name__}: recalibration passes "
                        "over them once per BatchNorm", "pass a list, a DataLoader, or a callable returning a fresh "
                        "iterable (lambda: make_batches()); or samples=N to read the first N inputs into memory")
    kept = list(_limited(batches, samples))  # read once; every pass then iterates the list
    return lambda: kept


def _fresh_calls(make: Callable[[], Any]) -> Callable[[], Iterable[Any]]:
    """Call ``make`` per pass; refuse what is not iterable, or the same (already consumed) iterator again."""
    previous: list[Any] = []  # the last iterable returned, kept alive so that an identity check is sound

    def fresh() -> Iterable[Any]:
        batches = make()
        if not isinstance(batches, Iterable):
            raise DataError(f"the batches callable returned a {type(batches).__name__}, not an iterable of batches",
                            "return a list of tensors, a DataLoader, or a generator of batches")
        if previous and batches is previous[0] and _one_shot(batches):
            raise DataError("the batches callable returned the same iterator twice: recalibration passes over the "
                            "data once per BatchNorm", "create the iterator inside the callable "
                            "(lambda: make_batches()), or pass a list")
        previous[:] = [batches]
        return batches

    return fresh


def _one_shot(batches: Iterable[Any]) -> bool:
    """An iterator that is its own iterator (a generator, map, iter(list)) is consumed by the first pass.

    Only iterators are asked: ``iter()`` on a DataLoader would start its workers.
    """
    return isinstance(batches, Iterator) and iter(batches) is batches


def bn_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every BatchNorm module, hidden ones too (the forward order comes from :func:`_forward_order`)."""
    return [(name, m) for name, m in all_modules(model).items() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def _forward_order(model: nn.Module, modules: list[tuple[str, nn.Module]], inputs: tuple[torch.Tensor, ...]) -> list[str]:
    order: list[str] = []
    handles = [m.register_forward_pre_hook(lambda mod, args, name=name: order.append(name) if name not in order else None)
               for name, m in modules]
    try:
        run_model(model, inputs)
    finally:
        for h in handles:
            h.remove()
    return order


def recalibrate(
    model: nn.Module,
    batches: Iterable[Any] | Callable[[], Iterable[Any]],
    *,
    samples: int | None = None,
    method: Method = "layerwise",
) -> RecalibrationResult:
    """Return a copy of ``model`` whose BN running statistics are the population statistics of ``batches``.

    ``batches`` yields tensors or ``(inputs, labels)`` tuples. The layer-by-layer method iterates it once per
    BN, so pass a re-iterable (a list, a DataLoader) or a callable returning a fresh iterable; a one-shot
    iterator (a generator) needs ``samples``, and its first ``samples`` inputs are then kept in memory.
    ``samples`` caps the inputs used (per process under ``torchrun``). Raises :class:`~bnfold.data.DataError`
    for empty or non-finite data (naming the first bad sample), and :class:`~bnfold.errors.BnfoldError` when
    a BN's new statistics would not be finite.
    """
    _check_options(samples, method)
    fresh = _passes(batches, samples)
    first = next(_limited(fresh(), samples), None)
    if first is None:
        raise DataError("the calibration data is empty: no batch holds any input",
                        "pass at least one batch of inputs (--data with at least one sample)")
    model = copy.deepcopy(model)
    original = copy.deepcopy(model).eval()
    modules = bn_modules(model)
    skipped = [(n, "no running statistics (track_running_stats=False)") for n, m in modules
               if not m.track_running_stats or m.running_mean is None]
    usable = [(n, m) for n, m in modules if m.track_running_stats and m.running_mean is not None]
    with _blame_data_shape(first):
        with eval_mode(model):
            order = _forward_order(model, usable, first)
        by_name = dict(usable)
        skipped += [(n, "not reached by the forward pass on the calibration data") for n, _ in usable
                    if n not in order]
        old = {n: (by_name[n].running_mean.detach().clone(), by_name[n].running_var.detach().clone()) for n in order}
        bns = [(n, by_name[n]) for n in order]
        moments, total = _METHODS[method](model, bns, fresh, samples)
        layers = [_drift(name, by_name[name], old[name], moments[name]) for name in order]
        with eval_mode(model), eval_mode(original):
            change = compare("recalibration", run_model(original, first), run_model(model, first))
    worst = max((math.inf if o.problem else o.max_rel for o in change.outputs), default=0.0)  # NaN: inf
    return RecalibrationResult(model.eval(), layers, skipped, total, worst, method)


def _check_options(samples: int | None, method: str) -> None:
    if samples is not None and (isinstance(samples, bool) or not isinstance(samples, int) or samples <= 0):
        raise BnfoldError(f"--samples must be a positive integer, got {samples!r}",
                          "leave it out (samples=None) to use all the data, or e.g. --samples 4096")
    if method not in _METHODS:
        raise BnfoldError(f"unknown recalibration method {method!r}", f"use one of {', '.join(_METHODS)}")


@contextlib.contextmanager
def _blame_data_shape(first: tuple[torch.Tensor, ...]) -> Iterator[None]:
    """run_model's hint names --input-shape, which recalibrate does not take: point at the data's shape instead."""
    try:
        yield
    except ModelRunError as exc:
        shapes = ", ".join(f"{tuple(t.shape)} ({dtype_name(t.dtype)})" for t in first)
        raise ModelRunError(exc.message, f"the calibration inputs have shape {shapes}; check that --data holds "
                                         "inputs of the shape and dtype the model takes, batch first "
                                         "(e.g. N, C, H, W)") from exc


def _accumulate(model: nn.Module, targets: list[tuple[str, nn.Module]], fresh, samples) -> tuple[dict[str, _Moments], int]:
    """One pass over the data, accumulating the inputs of ``targets``; all-reduced under torchrun."""
    moments = {name: _Moments() for name, _ in targets}
    handles = [m.register_forward_pre_hook(lambda mod, args, name=name: moments[name].add(args[0]))
               for name, m in targets]
    total = 0
    try:
        for inputs in _limited(fresh(), samples):
            run_model(model, inputs)
            total += inputs[0].shape[0]
    finally:
        for h in handles:
            h.remove()
    for m in moments.values():
        m.all_reduce()
    if _distributed():
        import torch.distributed as dist

        count = torch.tensor([total], dtype=torch.float64)
        dist.all_reduce(count)
        total = int(count.item())
    if total == 0:  # the first batch was read, so the data is re-read badly: an exhausted iterator
        raise DataError("a pass over the calibration data yielded no inputs, although the first batch was read",
                        "pass a list, a DataLoader, or a callable that returns a fresh iterable on each call")
    return moments, total


def _set(name: str, module: nn.Module, moments: _Moments) -> None:
    """Store the new statistics in the buffers' dtype; non-finite ones would poison every later layer."""
    mean, var = moments.mean_var()
    new_mean, new_var = mean.to(module.running_mean.dtype), var.to(module.running_var.dtype)
    if not (bool(torch.isfinite(new_mean).all()) and bool(torch.isfinite(new_var).all())):
        raise _non_finite(name, mean, var, new_var.dtype)
    with torch.no_grad():
        module.running_mean.copy_(new_mean)
        module.running_var.copy_(new_var)


def _non_finite(name: str, mean: torch.Tensor, var: torch.Tensor, dtype: torch.dtype) -> BnfoldError:
    if bool(torch.isfinite(mean).all()) and bool(torch.isfinite(var).all()):
        reason = f"its input's variance, up to {var.max().item():.3g}, overflows {dtype_name(dtype)}"
    else:  # the data was checked to be finite, so the model produced NaN/inf before this BN
        reason = "its input has NaN/inf values on the (finite) calibration data"
    return BnfoldError(f"BatchNorm {name!r}: the recalibrated statistics are not finite: {reason}",
                       "check the layers before it for NaN/inf weights or overflow, and that the data is scaled "
                       "as the model expects")


def _layerwise(model: nn.Module, bns: list[tuple[str, nn.Module]], fresh, samples) -> tuple[dict[str, _Moments], int]:
    result: dict[str, _Moments] = {}
    total = 0
    with eval_mode(model):
        for name, module in bns:
            moments, total = _accumulate(model, [(name, module)], fresh, samples)
            _set(name, module, moments[name])
            result.update(moments)
    return result, total


def _global(model: nn.Module, bns: list[tuple[str, nn.Module]], fresh, samples) -> tuple[dict[str, _Moments], int]:
    with eval_mode(model):
        saved = [(m, m.momentum) for _, m in bns]
        for _, m in bns:
            m.train()  # normalise with batch statistics; the running buffers are overwritten below
            m.momentum = 0.0  # and not updated meanwhile
        try:
            moments, total = _accumulate(model, bns, fresh, samples)
        finally:
            for m, momentum in saved:
                m.momentum = momentum
    for name, module in bns:
        _set(name, module, moments[name])
    return moments, total


_METHODS: dict[str, Callable[..., tuple[dict[str, _Moments], int]]] = {"layerwise": _layerwise, "global": _global}


def _drift(name: str, module: nn.Module, old: tuple[torch.Tensor, torch.Tensor], moments: _Moments) -> LayerDrift:
    new_mean, new_var = moments.mean_var()
    old_mean, old_var = (t.to(torch.float64) for t in old)
    eps = float(module.eps)
    shift = ((old_mean - new_mean).abs() / torch.sqrt(new_var + eps)).max().item()
    ratio = (old_var + eps) / (new_var + eps)
    return LayerDrift(name, moments.n, shift, float(torch.maximum(ratio, 1 / ratio).max().item()))
