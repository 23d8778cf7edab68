"""Eval-mode audit: static checks of BN statistics and behavioural probes of the eval model.

The probes judge behaviour, not flags, because batch statistics can be reached by many paths (a
``train()`` override, ``F.batch_norm(..., training=True)``, a BN kept in a plain Python list that
``model.eval()`` never reaches):

* batch independence: one sample in two batches of the same size with different random companions (same
  kernels, so a clean model agrees to the last bit), and the sample alone (batch 1) as its own check;
* determinism: the same batch twice;
* mode: every module's ``training`` flag at each call, and torch calls that force training.

Where a probe sees a dependence, hooks on every module name the first one whose output shows it.
All probes run on a copy: a BN in training mode would otherwise update the caller's running statistics.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from bnfold.compare import compare_output, flatten_outputs
from bnfold.discover.fx import graph_nodes
from bnfold.errors import first_line
from bnfold.findings import Finding
from bnfold.inputs import InputSpec, make_inputs, seeded
from bnfold.layers import BNRef, bn_ref, get_tensor, is_bn_module
from bnfold.runtime import run_model

DEGENERATE_SCALE = 1e3
#: Relative difference (to the output's scale) above which a probe calls two outputs different.
PROBE_RTOL = {"same_batch": 1e-5, "batch_1": 1e-3}
_FORCED_BN = {F.batch_norm: 5, torch.batch_norm: 5}  # position of the `training` argument
_DROPOUTS = {F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout}


@dataclass
class ProbeResult:
    name: str
    passed: bool
    detail: str
    figures: dict[str, Any] = field(default_factory=dict)


def hidden_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Modules kept in plain lists/tuples/dicts attributes: ``model.eval()`` and ``named_modules()`` miss them."""
    registered = {id(m) for m in model.modules()}
    found: dict[str, nn.Module] = {}
    for owner_name, owner in model.named_modules():
        for attr, value in vars(owner).items():
            if attr.startswith("_") and attr in ("_modules", "_parameters", "_buffers"):
                continue
            items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, (list, tuple)) else ()
            for key, item in items:
                if isinstance(item, nn.Module) and id(item) not in registered:
                    prefix = f"{owner_name}." if owner_name else ""
                    found[f"{prefix}{attr}[{key!r}]"] = item
    return found


def all_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Registered modules (dotted names) plus hidden ones and their children."""
    modules = dict(model.named_modules())
    for name, module in hidden_modules(model).items():
        for child_name, child in module.named_modules():
            modules[f"{name}.{child_name}" if child_name else name] = child
    return modules


# -- static checks -------------------------------------------------------------------------------------
def bn_refs(model: nn.Module) -> list[tuple[BNRef, nn.Module | None]]:
    """Every BN of ``model`` with its module: modules (hidden ones too), or batch-norm calls of an exported graph."""
    refs = [(bn_ref(name, m), m) for name, m in all_modules(model).items() if is_bn_module(m)]
    if isinstance(model, torch.fx.GraphModule) and not refs:  # a torch.export program: BNs are graph calls
        refs = [(n.bn, None) for n in graph_nodes(model, model).values() if n.bn is not None]
    return refs


def static_findings(model: nn.Module) -> list[Finding]:
    findings: list[Finding] = []
    for ref, module in bn_refs(model):
        if module is not None and not getattr(module, "track_running_stats", True):
            findings.append(Finding("BN003", ref.name, f"{type(module).__name__}(track_running_stats=False) "
                                                       "normalises every batch with its own statistics, also in eval"))
        elif ref.batch_stats:
            findings.append(Finding("BN003", ref.name, "running_mean/running_var are None although "
                                                       "track_running_stats=True: eval uses batch statistics"))
        elif module is not None:  # read the module itself: hidden modules have no path from the root
            findings += _stat_findings(module, bn_ref("", module), ref.name)
        else:
            findings += _stat_findings(model, ref, ref.name)
    return findings


def _stat_findings(root: nn.Module, ref: BNRef, name: str) -> list[Finding]:
    """Checks of one BN's tensors, read through ``ref``'s paths from ``root``; findings are reported as ``name``."""
    assert ref.mean is not None and ref.var is not None
    mean, var = get_tensor(root, ref.mean).detach(), get_tensor(root, ref.var).detach()
    weight = get_tensor(root, ref.weight).detach() if ref.weight else None
    bias = get_tensor(root, ref.bias).detach() if ref.bias else None
    for label, t in (("running_mean", mean), ("running_var", var), ("weight", weight), ("bias", bias)):
        if t is not None and not torch.isfinite(t).all():
            bad = int((~torch.isfinite(t)).nonzero()[0, 0])
            return [Finding("BN005", name, f"{label}[{bad}] = {t.flatten()[bad].item()}")]
    found = []
    try:
        tracked: int | None = int(get_tensor(root, ref.mean.rpartition(".")[0] + ".num_batches_tracked"
                                             if "." in ref.mean else "num_batches_tracked"))
    except (AttributeError, KeyError):
        tracked = None
    if bool((mean == 0).all() and (var == 1).all()) and not tracked:
        found.append(Finding("BN004", name, f"running_mean is all 0 and running_var all 1 over {mean.numel()} "
                                                f"channels (num_batches_tracked={tracked})"))
    gamma = torch.ones_like(var, dtype=torch.float64) if weight is None else weight.double().abs()
    scale = gamma / torch.sqrt(var.double() + ref.eps)
    worst = int(torch.argmax(scale))
    if scale[worst] > DEGENERATE_SCALE:
        found.append(Finding("BN006", name, f"running_var min {var.min().item():.3g} in channel "
                                                f"{int(torch.argmin(var))}: folding scales channel {worst} by "
                                                f"{scale[worst].item():.3g}"))
    return found


# -- probes ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Event:
    """A tensor crossing a module boundary: the first sample of a call's first input (``"in"``, recorded when
    the call starts, with ``caller`` the module whose forward makes the call) or of its output (``"out"``)."""

    kind: str
    module: str
    caller: str
    value: torch.Tensor


class _Tap:
    """Hooks on every module: records each call's ``training`` flag and the first sample of its input and output."""

    def __init__(self, modules: dict[str, nn.Module], sample: int, watch_finite: bool = False) -> None:
        self.modules = modules
        self.sample = sample
        self.watch_finite = watch_finite  # one run is enough to name the first non-finite module
        self.events: list[_Event] = []
        self.nonfinite: list[str] = []  # modules whose output held NaN/Inf, in completion order (innermost first)
        self.training_calls: dict[str, int] = {}
        self.stack: list[str] = []  # modules currently running, innermost last
        self.handles: list[Any] = []

    def __enter__(self) -> _Tap:
        names = {id(m): n for n, m in self.modules.items()}
        for module in self.modules.values():
            if isinstance(module, torch.jit.ScriptModule):
                continue  # compiled: no Python hooks, so probes judge its outputs only
            name = names[id(module)]
            self.handles.append(module.register_forward_pre_hook(lambda m, a, name=name: self._pre(name, m, a)))
            self.handles.append(module.register_forward_hook(lambda m, a, out, name=name: self._post(name, out)))
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self.handles:
            h.remove()

    def _first(self, value: Any) -> torch.Tensor | None:
        tensors = [t for t in tree_flatten(value)[0] if isinstance(t, torch.Tensor) and t.dim() > 0]
        return tensors[0][self.sample].detach().clone() if tensors and tensors[0].shape[0] > self.sample else None

    def _pre(self, name: str, module: nn.Module, args: Any) -> None:
        first = self._first(args)
        if first is not None:
            self.events.append(_Event("in", name, self.stack[-1] if self.stack else "", first))
        self.stack.append(name)
        if module.training and not isinstance(module, (nn.ModuleList, nn.ModuleDict)):
            self.training_calls[name] = self.training_calls.get(name, 0) + 1

    def _post(self, name: str, output: Any) -> None:
        if self.stack and self.stack[-1] == name:
            self.stack.pop()
        tensors = [t for t in tree_flatten(output)[0] if isinstance(t, torch.Tensor) and t.dim() > 0]
        if self.watch_finite and any(t.is_floating_point() and not bool(torch.isfinite(t).all()) for t in tensors):
            self.nonfinite.append(name)
        first = self._first(tensors)
        if first is not None:
            self.events.append(_Event("out", name, self.stack[-1] if self.stack else "", first))


class _ForcedTraining(TorchFunctionMode):
    """Sees torch calls that force training behaviour whatever the module flags say."""

    def __init__(self, tap: _Tap, model: nn.Module | None = None) -> None:
        super().__init__()
        self.tap = tap
        self.forced_bn: dict[str, int] = {}  # innermost running module -> calls
        self.dropouts: dict[str, int] = {}  # the module whose own forward calls dropout with training=True -> calls
        # Storage of the model's parameters: batch_norm(training=True) over a weight is weight standardisation
        # (timm's StdConv2d), which normalises the weight, not the batch.
        self.weights = ({p.untyped_storage().data_ptr() for p in model.parameters()} if isinstance(model, nn.Module)
                        else set())

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001 - torch's protocol
        kwargs = kwargs or {}
        if func in _FORCED_BN:
            pos = _FORCED_BN[func]
            training = kwargs.get("training", args[pos] if len(args) > pos else False)
            data = args[0] if args else kwargs.get("input")
            if training and isinstance(data, torch.Tensor) and data.untyped_storage().data_ptr() in self.weights:
                training = False  # a weight standardised, not a batch
            if training:
                where = self.tap.stack[-1] if self.tap.stack else ""
                self.forced_bn[where] = self.forced_bn.get(where, 0) + 1
        elif func in _DROPOUTS:
            training = kwargs.get("training", args[2] if len(args) > 2 else True)  # F.dropout defaults to True
            p = kwargs.get("p", args[1] if len(args) > 1 else 0.5)
            if training and p > 0:
                where = self.tap.stack[-1] if self.tap.stack else ""
                self.dropouts[where] = self.dropouts.get(where, 0) + 1
        return func(*args, **kwargs)


def _run(model: nn.Module, inputs: tuple[torch.Tensor, ...], seed: int) -> Any:
    return run_model(model, inputs, seed)


def _first_sample(output: Any, sample: int) -> dict[str, torch.Tensor]:
    return {k: v[sample] for k, v in flatten_outputs(output).items() if isinstance(v, torch.Tensor) and v.dim() > 0
            and v.shape[0] > sample}


def _nonfinite_count(t: torch.Tensor) -> int:
    return int((~torch.isfinite(t)).sum())


def _rel_change(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """How far run ``b`` is from run ``a``: the largest change of an element relative to its output's scale in
    ``a`` (scale 1 for an output that is zero everywhere), over the outputs both have, measured by
    :func:`bnfold.compare.compare_output` at atol 0.

    Infinite for a shape change, and for a NaN or Inf in one run where the other has another value: a NaN is
    never "no change". The same non-finite value at the same element of both runs is no change: the probes ask
    whether the output moved, and non-finite outputs are the ``finite`` probe's finding (BN014), not evidence of
    batch dependence or randomness."""
    worst = 0.0
    for key in [k for k in a if k in b]:
        x, y = a[key].detach().double(), b[key].detach().double()
        if x.shape == y.shape:
            same = ~torch.isfinite(x) & ((x == y) | (torch.isnan(x) & torch.isnan(y)))
            x, y = x.masked_fill(same, 0.0), y.masked_fill(same, 0.0)
        diff = compare_output(key, x, y, atol=0.0)
        worst = max(worst, math.inf if diff.problem else diff.max_abs / (diff.scale or 1.0))
    return worst


def _culprit(run_a: list[_Event], run_b: list[_Event], rtol: float) -> str | None:
    """The innermost module whose own forward makes the two runs part: at the first tensor crossing a module
    boundary that differs (events in the order they happen). An output that differs while the call's input did
    not blames the module called; an input that already differs blames its caller, whose own code (not a
    child's) changed it between two calls (``fc2(F.dropout(fc1(x)))`` in ``head.forward`` is ``head``'s)."""
    for a, b in zip(run_a, run_b):
        if (a.kind, a.module) != (b.kind, b.module):
            return a.caller if a.kind == "in" else a.module  # the runs took different paths from here on
        if _rel_change({a.module: a.value}, {a.module: b.value}) > rtol:
            return a.caller if a.kind == "in" else a.module
    return None


def probe(model: nn.Module, specs: list[InputSpec], seed: int = 0, has_modes: bool = True,
          fixed_batch: bool = False) -> tuple[list[Finding], list[ProbeResult]]:
    """Run the mode, batch-independence, batch-1 and determinism probes on a copy of ``model`` in eval mode.

    ``has_modes=False`` for graphs whose mode is baked in (``torch.export``): they are probed as they are.
    ``fixed_batch=True`` for programs that run at the example batch size only: batch 1 is not probed.
    """
    model = copy.deepcopy(model)
    if has_modes:
        model.eval()
    session = _Probes(model, specs, seed, fixed_batch)
    session.observe()
    session.finite()
    session.mode()
    session.batch_independence()
    session.batch_one()
    session.determinism()
    return session.findings, session.results


class _Probes:
    """The probes share one model copy, its modules, the probe inputs and the first probe run."""

    def __init__(self, model: nn.Module, specs: list[InputSpec], seed: int, fixed_batch: bool) -> None:
        self.model, self.seed, self.fixed_batch = model, seed, fixed_batch
        self.modules = all_modules(model)
        self.findings: list[Finding] = []
        self.results: list[ProbeResult] = []
        given = specs[0].shape[0] if specs[0].shape else 1
        self.batch = given if fixed_batch else max(given, 4)
        self.x0 = make_inputs(specs, seed, batch=1)
        companions = [make_inputs(specs, seed + k, batch=self.batch - 1) for k in (1, 2)]
        self.batch_a, self.batch_b = (tuple(torch.cat([a, c]) for a, c in zip(self.x0, comp)) for comp in companions)

    def _tapped(self, inputs: tuple[torch.Tensor, ...], seed: int, watch_finite: bool = False
                ) -> tuple[Any, _Tap, _ForcedTraining]:
        with _Tap(self.modules, sample=0, watch_finite=watch_finite) as tap, _ForcedTraining(tap, self.model) as forced:
            return _run(self.model, inputs, seed), tap, forced

    def observe(self) -> None:
        """Run batch A twice under two seeds: the determinism pair, and two calls for the mode probe (a forward
        may flip flags on its first call only). Model runs are the probes' whole cost, so each serves twice."""
        self.out_a, self.tap_a, forced_a = self._tapped(self.batch_a, self.seed, watch_finite=True)
        self.out_c, self.tap_c, forced_c = self._tapped(self.batch_a, self.seed + 1)
        self.training_calls: dict[str, int] = {}
        self.forced_bn: dict[str, int] = {}
        self.dropouts: dict[str, int] = {}  # module whose own forward calls dropout with training=True -> calls
        for source, target in ((self.tap_a.training_calls, self.training_calls),
                               (self.tap_c.training_calls, self.training_calls),
                               (forced_a.forced_bn, self.forced_bn), (forced_c.forced_bn, self.forced_bn),
                               (forced_a.dropouts, self.dropouts), (forced_c.dropouts, self.dropouts)):
            for name, calls in source.items():
                target[name] = target.get(name, 0) + calls

    def finite(self) -> None:
        """Finite inputs must give finite outputs. The probes that compare runs see a NaN that appears in one run
        only (an infinite change); this one reports every non-finite output and names the first module giving one."""
        bad = {name: _nonfinite_count(t) for name, t in flatten_outputs(self.out_a).items()
               if isinstance(t, torch.Tensor) and t.is_floating_point()}
        bad = {name: count for name, count in bad.items() if count}
        if bad:
            culprit = self.tap_a.nonfinite[0] if self.tap_a.nonfinite else ""
            name, count = next(iter(bad.items()))
            where = f"; {culprit} is the first module whose output is not finite" if culprit else ""
            self.findings.append(Finding("BN014", culprit, f"{name} has {count} NaN/Inf value(s) on finite inputs "
                                                           f"at batch {self.batch}{where}"))
        self.results.append(ProbeResult("finite outputs", not bad, "every output finite on finite inputs" if not bad
                                        else f"{len(bad)} output(s) with NaN/Inf values"))

    def mode(self) -> None:
        """Training flags at call time, and batch-norm calls that force training."""
        found = []
        for name, calls in self.training_calls.items():
            # Names with [...] come from hidden_modules(): plain lists/dicts that model.eval() never reaches.
            how = ("kept in a plain Python attribute, so model.eval() never reaches it" if "[" in name
                   else "training=True when called after model.eval()")
            module = self.modules[name]
            if is_bn_module(module) or isinstance(module, nn.modules.dropout._DropoutNd):
                found.append(Finding("BN001", name, f"{type(module).__name__}: {how} ({calls} call(s))"))
        for name, calls in self.forced_bn.items():
            if name not in self.training_calls:  # a module in training mode explains its own calls
                found.append(Finding("BN001", name, f"forward calls batch_norm with training=True ({calls} call(s))"))
        self.findings += found
        self.results.append(ProbeResult("mode", not found, "all modules in eval mode during forward" if not found
                                        else f"{len(found)} module(s) or call(s) in training mode"))

    def batch_independence(self) -> None:
        """One sample, two sets of companions at equal batch size: a sharp signal. Both runs use the same seed,
        so an active dropout draws the same mask and does not pass for batch dependence."""
        out_b, tap_b, _ = self._tapped(self.batch_b, self.seed)
        diff = _rel_change(_first_sample(self.out_a, 0), _first_sample(out_b, 0))
        self.dependent = diff > PROBE_RTOL["same_batch"]
        if self.dependent:
            where = _culprit(self.tap_a.events, tap_b.events, PROBE_RTOL["same_batch"]) or ""
            self.findings.append(Finding("BN002", where, f"sample 0's output changes by {diff:.3g} (relative to its "
                                                         f"scale) when its {self.batch - 1} batch companions change"))
        self.results.append(ProbeResult("batch independence", not self.dependent, f"max rel change {diff:.3g} across "
                                        f"companions at batch {self.batch}", {"max_rel": diff}))

    def batch_one(self) -> None:
        """The sample alone: other kernels than in a batch, so a looser threshold."""
        if self.fixed_batch:
            self.results.append(ProbeResult("batch 1", True, f"not checked: the program runs at batch {self.batch} "
                                                             "only"))
            return
        try:
            with torch.no_grad(), seeded(self.seed):
                alone = self.model(*self.x0)
            diff = _rel_change(_first_sample(alone, 0), _first_sample(self.out_a, 0))
            detail = f"max rel change {diff:.3g} between batch 1 and batch {self.batch}"
        except Exception as exc:  # "Expected more than 1 value per channel when training"
            diff = float("inf")
            detail = f"batch 1 fails: {first_line(exc, 200)}"
        failed = diff > PROBE_RTOL["batch_1"]
        if failed and not self.dependent:
            self.findings.append(Finding("BN002", "", f"batch 1 differs from batch {self.batch}: {detail}",
                                         check="batch 1"))
        self.results.append(ProbeResult("batch 1", not failed, detail, {"max_rel": diff}))

    def determinism(self) -> None:
        """The same batch under another seed (see :meth:`observe`); a deterministic model does not care."""
        diff = _rel_change(_first_sample(self.out_a, 0), _first_sample(self.out_c, 0))
        dropouts = sum(self.dropouts.values())
        random = diff > 0 or dropouts > 0
        if random:
            # the module whose own forward calls dropout with training=True, else where the runs first part
            where = next(iter(self.dropouts), None)
            if where is None:
                where = _culprit(self.tap_a.events, self.tap_c.events, 0.0) or ""
            extra = f"; {dropouts} dropout call(s) with training=True" if dropouts else ""
            self.findings.append(Finding("BN007", where, f"the same input gave outputs differing by {diff:.3g}{extra}"))
        self.results.append(ProbeResult("determinism", not random, f"max rel change {diff:.3g} between identical "
                                        "runs", {"max_rel": diff}))
