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
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from bnfold.compare import flatten_outputs
from bnfold.findings import Finding
from bnfold.fuse import run_model
from bnfold.inputs import InputSpec, make_inputs, seeded
from bnfold.layers import bn_ref, is_bn_module

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
def static_findings(model: nn.Module) -> list[Finding]:
    findings: list[Finding] = []
    for name, module in all_modules(model).items():
        if not is_bn_module(module):
            continue
        ref = bn_ref(name, module)
        if not getattr(module, "track_running_stats", True):
            findings.append(Finding("BN003", name, f"{type(module).__name__}(track_running_stats=False) normalises "
                                                   "every batch with its own statistics, also in eval"))
            continue
        if ref.batch_stats:  # track_running_stats=True but the buffers are None
            findings.append(Finding("BN003", name, "running_mean/running_var are None although "
                                                   "track_running_stats=True: eval uses batch statistics"))
            continue
        findings += _stat_findings(name, module)
    return findings


def _stat_findings(name: str, module: nn.Module) -> list[Finding]:
    mean, var = module.running_mean.detach(), module.running_var.detach()
    weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
    for label, t in (("running_mean", mean), ("running_var", var), ("weight", weight), ("bias", bias)):
        if isinstance(t, torch.Tensor) and not torch.isfinite(t).all():
            bad = int((~torch.isfinite(t.detach())).nonzero()[0, 0])
            return [Finding("BN005", name, f"{label}[{bad}] = {t.detach().flatten()[bad].item()}")]
    found = []
    tracked = getattr(module, "num_batches_tracked", None)
    untouched = bool((mean == 0).all() and (var == 1).all())
    if untouched and (tracked is None or int(tracked) == 0):
        found.append(Finding("BN004", name, f"running_mean is all 0 and running_var all 1 over {mean.numel()} channels"
                                            f" (num_batches_tracked={None if tracked is None else int(tracked)})"))
    gamma = torch.ones_like(var, dtype=torch.float64) if weight is None else weight.detach().double().abs()
    scale = gamma / torch.sqrt(var.double() + float(module.eps))
    worst = int(torch.argmax(scale))
    if scale[worst] > DEGENERATE_SCALE:
        found.append(Finding("BN006", name, f"running_var min {var.min().item():.3g} in channel "
                                            f"{int(torch.argmin(var))}: folding scales channel {worst} by "
                                            f"{scale[worst].item():.3g}"))
    return found


# -- probes ------------------------------------------------------------------------------------------------
class _Tap:
    """Hooks on every module: records each call's ``training`` flag and the first sample of its output."""

    def __init__(self, modules: dict[str, nn.Module], sample: int | None) -> None:
        self.modules = modules
        self.sample = sample
        self.outputs: list[tuple[str, torch.Tensor]] = []
        self.training_calls: dict[str, int] = {}
        self.stack: list[str] = []  # modules currently running, innermost last
        self.handles: list[Any] = []

    def __enter__(self) -> _Tap:
        names = {id(m): n for n, m in self.modules.items()}
        for module in self.modules.values():
            if isinstance(module, torch.jit.ScriptModule):
                continue  # compiled: no Python hooks, so probes judge its outputs only
            name = names[id(module)]
            self.handles.append(module.register_forward_pre_hook(lambda m, a, name=name: self._pre(name, m)))
            self.handles.append(module.register_forward_hook(lambda m, a, out, name=name: self._post(name, out)))
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self.handles:
            h.remove()

    def _pre(self, name: str, module: nn.Module) -> None:
        self.stack.append(name)
        if module.training and not isinstance(module, (nn.ModuleList, nn.ModuleDict)):
            self.training_calls[name] = self.training_calls.get(name, 0) + 1

    def _post(self, name: str, output: Any) -> None:
        if self.stack and self.stack[-1] == name:
            self.stack.pop()
        if self.sample is None:
            return
        tensors = [t for t in tree_flatten(output)[0] if isinstance(t, torch.Tensor) and t.dim() > 0]
        if tensors and tensors[0].shape[0] > self.sample:
            self.outputs.append((name, tensors[0][self.sample].detach().clone()))


class _ForcedTraining(TorchFunctionMode):
    """Sees torch calls that force training behaviour whatever the module flags say."""

    def __init__(self, tap: _Tap) -> None:
        super().__init__()
        self.tap = tap
        self.forced_bn: dict[str, int] = {}  # innermost running module -> calls
        self.dropouts = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001 - torch's protocol
        kwargs = kwargs or {}
        if func in _FORCED_BN:
            pos = _FORCED_BN[func]
            training = kwargs.get("training", args[pos] if len(args) > pos else False)
            if training:
                where = self.tap.stack[-1] if self.tap.stack else ""
                self.forced_bn[where] = self.forced_bn.get(where, 0) + 1
        elif func in _DROPOUTS:
            training = kwargs.get("training", args[2] if len(args) > 2 else True)  # F.dropout defaults to True
            p = kwargs.get("p", args[1] if len(args) > 1 else 0.5)
            self.dropouts += bool(training) and p > 0
        return func(*args, **kwargs)


def _run(model: nn.Module, inputs: tuple[torch.Tensor, ...], seed: int) -> Any:
    return run_model(model, inputs, seed)


def _first_sample(output: Any, sample: int) -> dict[str, torch.Tensor]:
    return {k: v[sample] for k, v in flatten_outputs(output).items() if isinstance(v, torch.Tensor) and v.dim() > 0
            and v.shape[0] > sample}


def _rel_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    worst = 0.0
    for key in a.keys() & b.keys():
        x, y = a[key].double(), b[key].double()
        if x.shape != y.shape:
            return float("inf")
        scale = float(x.abs().max()) or 1.0
        worst = max(worst, float((x - y).abs().max()) / scale)
    return worst


def _culprit(run_a: list[tuple[str, torch.Tensor]], run_b: list[tuple[str, torch.Tensor]], rtol: float) -> str | None:
    """The first module (in completion order: innermost first) whose first-sample output differs."""
    for (name_a, out_a), (name_b, out_b) in zip(run_a, run_b):
        if name_a != name_b:
            return name_a  # the two runs took different paths from here on
        if out_a.shape != out_b.shape or _rel_diff({"o": out_a}, {"o": out_b}) > rtol:
            return name_a
    return None


def probe(model: nn.Module, specs: list[InputSpec], seed: int = 0, has_modes: bool = True
          ) -> tuple[list[Finding], list[ProbeResult]]:
    """Run the mode, batch-independence and determinism probes on a copy of ``model`` in eval mode.

    ``has_modes=False`` for graphs whose mode is baked in (``torch.export``): they are probed as they are.
    """
    model = copy.deepcopy(model)
    if has_modes:
        model.eval()
    modules = all_modules(model)
    findings: list[Finding] = []
    results: list[ProbeResult] = []
    batch = max(specs[0].shape[0] if specs[0].shape else 1, 4)
    x0 = make_inputs(specs, seed, batch=1)
    companions = [make_inputs(specs, seed + k, batch=batch - 1) for k in (1, 2)]
    batch_a, batch_b = (tuple(torch.cat([a, c]) for a, c in zip(x0, comp)) for comp in companions)

    # Mode: training flags at call time, over two calls (a forward may flip flags on its first call only).
    with _Tap(modules, sample=None) as tap, _ForcedTraining(tap) as forced:
        _run(model, batch_a, seed)
        _run(model, batch_a, seed)
    for name, calls in tap.training_calls.items():
        # Names with [...] come from hidden_modules(): plain lists/dicts that model.eval() never reaches.
        how = ("kept in a plain Python attribute, so model.eval() never reaches it" if "[" in name
               else "training=True when called after model.eval()")
        if is_bn_module(modules[name]) or isinstance(modules[name], nn.modules.dropout._DropoutNd):
            findings.append(Finding("BN001", name, f"{type(modules[name]).__name__}: {how} ({calls} call(s))"))
    for name, calls in forced.forced_bn.items():
        if name not in tap.training_calls:  # a module in training mode explains its own calls
            findings.append(Finding("BN001", name, f"forward calls batch_norm with training=True ({calls} call(s))"))
    results.append(ProbeResult("mode", not findings, "all modules in eval mode during forward" if not findings else
                               f"{len(findings)} module(s) or call(s) in training mode"))

    # Batch independence at equal batch size: a sharp signal. The RNG is reseeded before each run so that
    # an active dropout draws the same mask for both and does not pass for batch dependence.
    with _Tap(modules, sample=0) as tap_a:
        out_a = _run(model, batch_a, seed)
    with _Tap(modules, sample=0) as tap_b:
        out_b = _run(model, batch_b, seed)
    diff = _rel_diff(_first_sample(out_a, 0), _first_sample(out_b, 0))
    dependent = diff > PROBE_RTOL["same_batch"]
    if dependent:
        where = _culprit(tap_a.outputs, tap_b.outputs, PROBE_RTOL["same_batch"]) or ""
        findings.append(Finding("BN002", where, f"sample 0's output changes by {diff:.3g} (relative to its scale) "
                                                f"when its {batch - 1} batch companions change"))
    results.append(ProbeResult("batch independence", not dependent,
                               f"max rel change {diff:.3g} across companions at batch {batch}", {"max_rel": diff}))

    # Batch 1: the sample alone (different kernels, so a looser threshold).
    try:
        with torch.no_grad(), seeded(seed):
            alone = model(*x0)
        diff1 = _rel_diff(_first_sample(alone, 0), _first_sample(out_a, 0))
        detail = f"max rel change {diff1:.3g} between batch 1 and batch {batch}"
    except Exception as exc:  # "Expected more than 1 value per channel when training"
        diff1 = float("inf")
        detail = f"batch 1 fails: {str(exc).strip().splitlines()[0][:200]}"
    single_dependent = diff1 > PROBE_RTOL["batch_1"]
    if single_dependent and not dependent:
        findings.append(Finding("BN002", "", f"batch 1 differs from batch {batch}: {detail}"))
    results.append(ProbeResult("batch 1", not single_dependent, detail, {"max_rel": diff1}))

    # Determinism: the same batch again under another seed; a deterministic model does not care.
    with _Tap(modules, sample=0) as tap_c:
        out_c = _run(model, batch_a, seed + 1)
    diff2 = _rel_diff(_first_sample(out_a, 0), _first_sample(out_c, 0))
    random = diff2 > 0 or forced.dropouts > 0
    if random:
        where = _culprit(tap_a.outputs, tap_c.outputs, 0.0) or ""
        extra = f"; {forced.dropouts} dropout call(s) with training=True" if forced.dropouts else ""
        findings.append(Finding("BN007", where, f"the same input gave outputs differing by {diff2:.3g}{extra}"))
    results.append(ProbeResult("determinism", not random, f"max rel change {diff2:.3g} between identical runs",
                               {"max_rel": diff2}))
    return findings, results
