#!/usr/bin/env python
"""Benchmark ``bnfold.fuse``: latency of the folded model, fold time and peak memory.

For every reference model (``models.zoo.REFERENCE_MODELS``), ``resnet50`` and the bench-sized
re-parameterisable models below (``BENCH_SPECS``) this measures CPU eager latency (``torch.no_grad``,
eval) at batch 1 and 8 of four variants:

* ``unfolded``: the eval model as built by ``zoo.build``;
* ``folded``: ``bnfold.fuse(model, (x,)).model``;
* ``fx-fuse``: ``torch.fx.experimental.optimization.fuse(model)`` ("n/a" where fx cannot trace);
* ``bound``: a copy with every BatchNorm-like module replaced by ``nn.Identity`` (or, for BN
  subclasses that apply an activation through ``act``/``activation``, by that activation). This
  is *not* numerically equivalent to the model; it only bounds what folding can achieve.

Where bnfold merges branches (RepVGG / MobileOne re-parameterisation: an Add of conv->BN, conv, BN
and identity branches reading one input becomes one conv), the folded model has fewer convs than
the bound, which keeps every branch; so there "folded" can run *faster* than the bound. A second
table lists those models with ``folded / bound`` (the ratio of median latencies; < 1 means faster
than the bound) and the conv count before and after.

``BENCH_SPECS``: the zoo's RepVGG-like and MobileOne-like tiny models (3x16x16 input) are dominated by
per-op overhead, so the same classes (``models/reparam.py``) are also built at realistic widths and
input sizes here (``repvgg_w64_112``: RepVGG(width=64), 64/128 channels, 3x112x112 input; ...), with
deterministic weights and BN statistics randomised by ``zoo.randomize_bn_statistics`` as ``zoo.build``
does. They are not part of the zoo; pass their names to ``--models`` like any zoo model.

A fifth, control variant (``bound-copy``, an identical second copy of ``bound``) is timed the same
way; ``bound A/A %`` (bound-copy vs bound) shows how far two identical models differ, i.e. the
noise floor against which "folded vs bound %" should be read (``--no-control`` drops it).

Variants are timed in interleaved rounds (each round times every variant once, in a rotating
order) and the median per variant is reported. Each sample times ``number`` consecutive calls
(calibrated so one sample lasts about ``--sample-ms``) and divides.

Fold time is the wall time of ``bnfold.fuse`` (fastest of ``--fuse-repeats`` calls in this process,
so one-off import/first-trace costs are excluded; the cold first call is measured in the memory
subprocess) with ``result.timings`` (discover / fold / compare).

The machine may be shared: rounds during which other processes used the CPU (from /proc/stat) are
discarded and repeated, within a time budget; the JSON records how many were.

Peak memory: each model is fused once in a fresh subprocess (this script with a hidden flag);
the RSS high-water mark is read after building the model and after ``fuse``; the increase is
reported relative to the model's parameter + buffer bytes. On Linux the high-water mark is reset
right before ``fuse`` (``/proc/self/clear_refs``) and read as ``VmHWM``: ``ru_maxrss`` cannot be
used as is, because in a child started by ``subprocess`` it still carries the parent's resident
size from before ``exec`` (1.1 GB here, while the parent holds resnet50 and its variants) and it
cannot be reset. Elsewhere ``ru_maxrss`` is used without a reset (then an underestimate).

If CUDA is available, GPU latency (fp32 and fp16, batch 1 and 64, CUDA events) is measured too.

Only measurement lives here; all folding logic is bnfold's.

Usage::

    python scripts/bench_fuse.py                       # everything, a few minutes on 2 cores
    python scripts/bench_fuse.py --models resnet50 --repeats 40 --json out/bench.json
    python scripts/bench_fuse.py --models repvgg_tiny,mobileone_tiny,repvgg_w64_112 --no-memory
"""

from __future__ import annotations

import argparse
import copy
import functools
import gc
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch import nn  # noqa: E402

import bnfold  # noqa: E402
from models import zoo  # noqa: E402
from models.reparam import MobileOne, RepVGG  # noqa: E402

VARIANTS = ("unfolded", "folded", "fx-fuse", "bound")
CPU_BATCHES = (1, 8)
GPU_BATCHES = (1, 64)
TARGET_BOUND_PCT = 3.0
TARGET_FOLD_S = 1.0
TARGET_MEM_X = 2.0
WARMUP_MODEL = "resnet_digits"

#: Bench-sized re-parameterisable models: the zoo's RepVGG / MobileOne classes at realistic widths and input
#: sizes (the zoo's tiny ones, 16 channels on 3x16x16, measure per-op overhead more than convolutions). The
#: batch in ``input_shape`` is the one ``fuse`` is called with; latency is measured at ``CPU_BATCHES``.
BENCH_SPECS: dict[str, zoo.ModelSpec] = {spec.name: spec for spec in (
    zoo.ModelSpec("repvgg_w32_64", functools.partial(RepVGG, width=32), (2, 3, 64, 64), True),
    zoo.ModelSpec("repvgg_w64_112", functools.partial(RepVGG, width=64), (2, 3, 112, 112), True),
    zoo.ModelSpec("mobileone_w32_64", functools.partial(MobileOne, width=32), (2, 3, 64, 64), True),
    zoo.ModelSpec("mobileone_w64_112", functools.partial(MobileOne, width=64), (2, 3, 112, 112), True),
)}


def get_spec(name: str) -> zoo.ModelSpec:
    """A zoo model's spec (``zoo.get_spec``) or one of ``BENCH_SPECS``."""
    return BENCH_SPECS[name] if name in BENCH_SPECS else zoo.get_spec(name)


def build(name: str, seed: int = 0) -> nn.Module:
    """``zoo.build(name)``, or a ``BENCH_SPECS`` model built the same way (seeded weights, randomised BN statistics,
    eval mode)."""
    if name not in BENCH_SPECS:
        return zoo.build(name, seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BENCH_SPECS[name].factory()
    zoo.randomize_bn_statistics(model, torch.Generator().manual_seed(seed))
    return model.eval()


# --------------------------------------------------------------------------------------------- variants


def is_bn_like(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.batchnorm._BatchNorm) or "BatchNorm" in type(module).__name__


def bn_stand_in(module: nn.Module) -> nn.Module:
    """What the lower bound puts where a BN was: its activation if it applies one, else Identity."""
    overrides_forward = isinstance(module, nn.modules.batchnorm._BatchNorm) and type(module).forward not in (
        nn.BatchNorm1d.forward, nn.BatchNorm2d.forward, nn.BatchNorm3d.forward, nn.SyncBatchNorm.forward,
        nn.modules.batchnorm._BatchNorm.forward)
    for attr in ("act", "activation"):
        act = getattr(module, attr, None)
        if isinstance(act, nn.Module) and (overrides_forward or not isinstance(module, nn.modules.batchnorm._BatchNorm)):
            return copy.deepcopy(act)
    return nn.Identity()


def lower_bound_model(model: nn.Module) -> tuple[nn.Module, int]:
    """A deepcopy with every BN-like module swapped for Identity/its activation; returns (model, count)."""
    bound = copy.deepcopy(model).eval()
    targets = [name for name, m in bound.named_modules() if name and is_bn_like(m)]
    # Replace outermost first; a BN nested inside a replaced BN disappears with it.
    replaced = 0
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        try:
            parent = bound.get_submodule(parent_name) if parent_name else bound
            module = getattr(parent, child)
        except AttributeError:
            continue
        if not is_bn_like(module):
            continue
        setattr(parent, child, bn_stand_in(module))
        replaced += 1
    return bound, replaced


def fx_fuse_model(model: nn.Module) -> tuple[nn.Module | None, str]:
    try:
        from torch.fx.experimental.optimization import fuse as fx_fuse

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fused = fx_fuse(copy.deepcopy(model).eval())
        return fused.eval(), "ok"
    except Exception as exc:  # untraceable models
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        return None, f"n/a ({type(exc).__name__}: {first[:100]})"


def bn_left_in_graph(gm: nn.Module) -> int:
    """BN-like modules plus ``F.batch_norm`` calls left in an fx GraphModule (fx inlines user BN subclasses)."""
    calls = 0
    graph = getattr(gm, "graph", None)
    if graph is not None:
        targets = {torch.nn.functional.batch_norm, torch.batch_norm, torch.ops.aten.batch_norm.default}
        calls = sum(1 for n in graph.nodes if n.op == "call_function" and n.target in targets)
    return sum(is_bn_like(m) for m in gm.modules()) + calls


_CONV_FUNCTIONS = {torch.nn.functional.conv1d, torch.nn.functional.conv2d, torch.nn.functional.conv3d,
                   torch.nn.functional.conv_transpose1d, torch.nn.functional.conv_transpose2d,
                   torch.nn.functional.conv_transpose3d}


def conv_count(model: nn.Module) -> int:
    """Convolutions the model runs: for an fx GraphModule, the conv module calls and functional conv calls in its
    graph; otherwise the conv modules it holds."""
    graph = getattr(model, "graph", None)
    if graph is not None:
        modules = dict(model.named_modules())
        return sum(1 for n in graph.nodes
                   if (n.op == "call_module" and isinstance(modules.get(n.target), nn.modules.conv._ConvNd))
                   or (n.op == "call_function" and n.target in _CONV_FUNCTIONS))
    return sum(isinstance(m, nn.modules.conv._ConvNd) for m in model.modules())


def leaves(output: Any) -> list[torch.Tensor]:
    from torch.utils._pytree import tree_leaves

    return [t for t in tree_leaves(output) if isinstance(t, torch.Tensor)]


@torch.no_grad()
def max_abs_diff(reference: nn.Module, other: nn.Module, x: torch.Tensor) -> tuple[float, float]:
    """(max |other - reference|, max |reference|) over all output tensors."""
    ref, out = leaves(reference(x)), leaves(other(x))
    diff = max(float((a.double() - b.double()).abs().max()) for a, b in zip(ref, out))
    scale = max(float(a.double().abs().max()) for a in ref)
    return diff, scale


def param_bytes(model: nn.Module) -> int:
    seen: set[int] = set()
    total = 0
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def input_for(spec: zoo.ModelSpec, batch: int, seed: int = 0, device: str = "cpu",
              dtype: torch.dtype = torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + batch)
    x = torch.randn((batch, *spec.input_shape[1:]), generator=g)
    return x.to(device=device, dtype=dtype)


# --------------------------------------------------------------------------------------------- timing


class CpuMonitor:
    """CPU time used by *other* processes (system-wide busy ticks minus this process's), from /proc.

    The benchmark machine may be shared (e.g. test runs of people working on the same checkout); a
    measurement round during which other processes used the CPU is discarded and repeated.
    """

    def __init__(self) -> None:
        self.hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self.ncpu = os.cpu_count() or 1
        self.available = self._read() is not None

    @staticmethod
    def _read() -> tuple[int, int] | None:
        try:
            with open("/proc/stat") as f:
                fields = [int(v) for v in f.readline().split()[1:]]
            busy = sum(fields) - fields[3] - (fields[4] if len(fields) > 4 else 0)  # minus idle, iowait
            with open("/proc/self/stat") as f:
                own = f.read().rpartition(")")[2].split()
            return busy, int(own[11]) + int(own[12])  # utime + stime, all threads
        except (OSError, ValueError, IndexError):
            return None

    def mark(self) -> tuple[int, int] | None:
        return self._read()

    def foreign_ticks(self, since: tuple[int, int] | None) -> int:
        now = self._read()
        if since is None or now is None:
            return 0
        return max(0, (now[0] - since[0]) - (now[1] - since[1]))

    def wait_for_quiet(self, max_wait_s: float, window_s: float = 0.5, threshold: float = 0.1) -> float:
        """Sleep until other processes use under ``threshold`` of the machine for a window; returns seconds waited."""
        if not self.available or max_wait_s <= 0:
            return 0.0
        t0 = time.perf_counter()
        while True:
            m = self.mark()
            time.sleep(window_s)
            if self.foreign_ticks(m) <= threshold * window_s * self.hz * self.ncpu:
                return time.perf_counter() - t0
            if time.perf_counter() - t0 > max_wait_s:
                return time.perf_counter() - t0


MONITOR = CpuMonitor()


@torch.no_grad()
def bench_cpu(fns: dict[str, Callable[[], Any]], repeats: int, sample_s: float, warmup: int,
              max_case_s: float, min_rounds: int, quiet_wait_s: float) -> tuple[dict[str, float], dict[str, Any]]:
    """Median seconds per call for each fn, measured in interleaved rounds.

    Each round times every fn once (``number`` consecutive calls, in a rotating order). Rounds during
    which other processes used more than a tick or two of CPU are "contended": they are kept aside and
    replaced, until ``repeats`` clean rounds are collected or the time budget runs out (about
    ``max_case_s``; at least ``min_rounds`` rounds, contended ones included, are always run).
    """
    names = list(fns)
    waited = MONITOR.wait_for_quiet(quiet_wait_s)
    for name in names:  # warm-up (oneDNN primitive caches, allocator, thread pool)
        for _ in range(warmup):
            fns[name]()
    # Calibrate a common number of calls per sample on the slowest variant (best of 3 single calls).
    single = {}
    for name in names:
        best = float("inf")
        for _ in range(3 if warmup else 1):
            t0 = time.perf_counter()
            fns[name]()
            best = min(best, time.perf_counter() - t0)
        single[name] = best
    number = max(1, math.ceil(sample_s / max(max(single.values()), 1e-7)))
    est_round = number * sum(single.values())
    target = max(min(repeats, min_rounds), min(repeats, int(max_case_s / max(est_round, 1e-9))))
    hard_stop = time.perf_counter() + max(2 * max_case_s, 3 * target * est_round)
    clean: dict[str, list[float]] = {n: [] for n in names}
    dirty: dict[str, list[float]] = {n: [] for n in names}
    rounds = contended = 0
    gc_was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        while True:
            order = names[rounds % len(names):] + names[:rounds % len(names)]
            mark = MONITOR.mark()
            t_round = time.perf_counter()
            got = {}
            for name in order:
                fn = fns[name]
                t0 = time.perf_counter()
                for _ in range(number):
                    fn()
                got[name] = (time.perf_counter() - t0) / number
            wall = time.perf_counter() - t_round
            rounds += 1
            # Allow 2 ticks of foreign CPU, or 5% of the round's CPU capacity, whichever is larger.
            allowance = max(2, 0.05 * wall * MONITOR.hz * MONITOR.ncpu)
            is_clean = MONITOR.foreign_ticks(mark) <= allowance
            contended += not is_clean
            for name, v in got.items():
                (clean if is_clean else dirty)[name].append(v)
            n_clean = len(clean[names[0]])
            if n_clean >= target or (rounds >= min_rounds and time.perf_counter() > hard_stop):
                break
    finally:
        if gc_was_enabled:
            gc.enable()
    n_clean = len(clean[names[0]])
    use = clean if n_clean >= min(3, target) else {n: clean[n] + dirty[n] for n in names}
    med = {n: statistics.median(v) for n, v in use.items()}
    spread = {n: (min(v), max(v)) for n, v in use.items()}
    return med, {"rounds": rounds, "clean_rounds": n_clean, "contended_rounds": contended,
                 "used_contended": use is not clean, "number": number, "min_max_s": spread,
                 "waited_for_quiet_s": waited}


@torch.no_grad()
def bench_cuda(fns: dict[str, Callable[[], Any]], repeats: int, warmup: int, number: int = 10) -> dict[str, float]:
    names = list(fns)
    for name in names:
        for _ in range(warmup):
            fns[name]()
    torch.cuda.synchronize()
    samples: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(number):
                fns[name]()
            end.record()
            torch.cuda.synchronize()
            samples[name].append(start.elapsed_time(end) / 1000.0 / number)
    return {n: statistics.median(v) for n, v in samples.items()}


# --------------------------------------------------------------------------------------------- memory child


def rss_now_kb() -> int | None:
    return _proc_status_kb("VmRSS")


def maxrss_kb() -> int:
    """The process's RSS high-water mark in KiB.

    ``VmHWM`` from ``/proc/self/status`` where available, else ``getrusage(RUSAGE_SELF).ru_maxrss``.
    Both are the same high-water mark, but ``ru_maxrss`` also folds in the mark saved whenever a
    thread exits, so once torch's worker threads have come and gone it can no longer be reset;
    ``VmHWM`` is reset by :func:`reset_peak_rss`.
    """
    hwm = _proc_status_kb("VmHWM")
    if hwm is not None:
        return hwm
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb // 1024 if sys.platform == "darwin" else kb  # macOS reports bytes


def _proc_status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Reset the RSS high-water mark (Linux >= 4.0: ``echo 5 > /proc/self/clear_refs``); False if unsupported.

    Without a reset, ``ru_maxrss`` right after building a model still holds transient peaks from
    importing torch/bnfold (tens of MB), which would hide anything smaller that ``fuse`` allocates.
    """
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def memory_child(name: str, mode: str) -> dict[str, Any]:
    """Runs in a fresh process: build the model, then either ``fuse`` it once (``mode="fuse"``: cold, as the
    first thing after loading a model), or ``fuse`` it after fusing a tiny warm-up model (``"fuse-warm"``:
    without one-off import / first-trace / oneDNN set-up costs), or run one plain no-grad forward pass
    (``"forward"``, for context: fuse's compare step runs the model too); tracks the RSS high-water mark."""
    if mode == "fuse-warm":  # pay imports, the first fx trace and oneDNN set-up on another, tiny model first
        warm = get_spec(WARMUP_MODEL)
        bnfold.fuse(build(WARMUP_MODEL), (input_for(warm, warm.input_shape[0]),))
    spec = get_spec(name)
    model = build(name)
    x = input_for(spec, spec.input_shape[0])
    gc.collect()
    hw_before_reset = maxrss_kb()
    reset = reset_peak_rss()
    hw_build, cur_build = maxrss_kb(), rss_now_kb()
    out: dict[str, Any] = {}
    t0 = time.perf_counter()
    if mode in ("fuse", "fuse-warm"):
        result = bnfold.fuse(model, (x,))
        out.update(cold_fuse_timings=dict(result.timings), ok=result.ok)
    else:
        with torch.no_grad():
            model(x)
    elapsed = time.perf_counter() - t0
    hw_after = maxrss_kb()
    return {
        "mode": mode,
        "param_bytes": param_bytes(model),
        "peak_reset": reset,
        "maxrss_import_build_kb": hw_before_reset,
        "ru_maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        "maxrss_build_kb": hw_build,
        "rss_build_kb": cur_build,
        "maxrss_after_kb": hw_after,
        "increase_kb": hw_after - hw_build,
        "elapsed_s": elapsed,
        **out,
    }


def _run_child(name: str, mode: str, threads: int) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_memory-child", name, "--_memory-mode", mode,
           "--threads", str(threads)]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=str(ROOT), env=env, timeout=600)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("@@MEM@@"):
            return json.loads(line[len("@@MEM@@"):])
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return {"error": f"memory subprocess ({mode}) failed (rc {proc.returncode}): {tail}"}


def measure_memory(name: str, threads: int) -> dict[str, Any]:
    fused = _run_child(name, "fuse", threads)
    if "error" in fused:
        return fused
    warm = _run_child(name, "fuse-warm", threads)
    forward = _run_child(name, "forward", threads)
    pb = fused["param_bytes"]
    mem = {
        "param_bytes": pb,
        "peak_reset": fused["peak_reset"],
        "fuse_increase_kb": fused["increase_kb"],
        "x_params": fused["increase_kb"] * 1024 / pb if pb else float("nan"),
        "warm_fuse_increase_kb": warm.get("increase_kb"),
        "warm_x_params": warm["increase_kb"] * 1024 / pb if pb and "increase_kb" in warm else None,
        "forward_increase_kb": forward.get("increase_kb"),
        "forward_x_params": forward["increase_kb"] * 1024 / pb if pb and "increase_kb" in forward else None,
        "cold_fuse_total_s": fused["elapsed_s"],
        "cold_fuse_timings": fused.get("cold_fuse_timings"),
        "fuse_child": fused,
        "fuse_warm_child": warm,
        "forward_child": forward,
    }
    return mem


# --------------------------------------------------------------------------------------------- per model


def fuse_timed(model: nn.Module, x: torch.Tensor, repeats: int, quiet_wait_s: float) -> tuple[Any, dict[str, Any]]:
    """Call ``bnfold.fuse`` ``repeats`` times (warm: after the first call in this process, imports and the
    first fx trace are paid); report the fastest call, the least disturbed by anything else running."""
    runs = []
    result = None
    for _ in range(max(1, repeats)):
        MONITOR.wait_for_quiet(quiet_wait_s)
        mark = MONITOR.mark()
        t0 = time.perf_counter()
        result = bnfold.fuse(model, (x,))
        runs.append((time.perf_counter() - t0, dict(result.timings), MONITOR.foreign_ticks(mark)))
    total, timings, foreign = min(runs, key=lambda r: r[0])
    df = timings.get("discover", 0.0) + timings.get("fold", 0.0)
    return result, {"total_s": total, "discover_fold_s": df, "timings": timings, "foreign_ticks": foreign,
                    "all_totals_s": sorted(r[0] for r in runs)}


def bench_model(name: str, args: argparse.Namespace, log: Callable[[str], None]) -> dict[str, Any]:
    spec = get_spec(name)
    model = build(name)
    x_fuse = input_for(spec, spec.input_shape[0])
    entry: dict[str, Any] = {
        "name": name,
        "loadavg_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "params": sum(p.numel() for p in model.parameters()),
        "param_bytes": param_bytes(model),
        "traceable": spec.traceable,
        "fuse_input_shape": list(spec.input_shape),
        "input": "x".join(str(d) for d in spec.input_shape[1:]),
    }

    try:
        result, fold_time = fuse_timed(model, x_fuse, args.fuse_repeats, args.quiet_wait_s)
    except Exception as exc:
        entry["error"] = f"bnfold.fuse raised {type(exc).__name__}: {exc}"
        log(f"[{name}] {entry['error']}")
        return entry
    folded = result.model
    positions: dict[str, int] = {}
    for fold in result.folded:
        positions[fold.position] = positions.get(fold.position, 0) + 1
    entry["bnfold"] = {
        "ok": result.ok,
        "model_type": type(folded).__name__,
        "positions": positions,
        "discovery": result.discovery,
        "folded": len(result.folded),
        "skipped": [{"bn": s.bn if isinstance(s.bn, str) else getattr(s.bn, "name", str(s.bn)), "reason": s.reason}
                    for s in result.skipped],
        "notes": list(result.notes),
        **fold_time,
    }
    fx_model, fx_status = fx_fuse_model(model)
    bound, n_bn = lower_bound_model(model)
    entry["fx_fuse"] = fx_status
    entry["bn_like_modules"] = sum(is_bn_like(m) for m in model.modules())
    entry["fx_fuse_bn_like_left"] = None if fx_model is None else bn_left_in_graph(fx_model)
    entry["folded_bn_like_left"] = sum(is_bn_like(m) for m in folded.modules())
    entry["bn_like_modules_replaced_in_bound"] = n_bn
    entry["convs"] = {"unfolded": conv_count(model), "folded": conv_count(folded), "bound": conv_count(bound)}
    log(f"[{name}] fuse ok={result.ok} folded={len(result.folded)} skipped={len(result.skipped)} "
        f"fold={fold_time['discover_fold_s']:.3f}s total={fold_time['total_s']:.3f}s; fx-fuse: {fx_status}; "
        f"BN-like modules left: bnfold {entry['folded_bn_like_left']}, fx-fuse {entry['fx_fuse_bn_like_left']} "
        f"of {entry['bn_like_modules']}; positions {positions}; convs {entry['convs']}")

    variants: dict[str, nn.Module] = {"unfolded": model, "folded": folded, "bound": bound}
    if args.control:  # A/A control: a second, identical copy of the bound; its gap is the noise floor
        variants["bound-copy"] = copy.deepcopy(bound)
    if fx_model is not None:
        variants["fx-fuse"] = fx_model

    entry["cpu"] = []
    repeats = args.repeats
    for batch in CPU_BATCHES:
        x = input_for(spec, batch)
        parity = {}
        for label in ("folded", "fx-fuse"):
            if label in variants:
                diff, scale = max_abs_diff(model, variants[label], x)
                parity[label] = {"max_abs_diff": diff, "max_abs_ref": scale}
        fns = {k: (lambda m=m, x=x: m(x)) for k, m in variants.items()}
        for attempt in range(1 + max(0, args.retries)):
            med, info = bench_cpu(fns, repeats, args.sample_ms / 1000, args.warmup, args.max_case_s, args.min_rounds,
                                   args.quiet_wait_s * (1 + attempt))
            if not info["used_contended"]:
                break
            log(f"[{name}] b{batch}: only {info['clean_rounds']}/{info['rounds']} rounds free of other processes' CPU "
                f"use" + ("; measuring again" if attempt < args.retries else "; keeping the contended figures"))
        info["attempts"] = attempt + 1
        row = {
            "batch": batch,
            **{f"{k}_ms": (med[k] * 1000 if k in med else None) for k in VARIANTS},
            "rounds": info["rounds"],
            "clean_rounds": info["clean_rounds"],
            "contended_rounds": info["contended_rounds"],
            "used_contended": info["used_contended"],
            "attempts": info["attempts"],
            "waited_for_quiet_s": info["waited_for_quiet_s"],
            "calls_per_sample": info["number"],
            "min_max_ms": {k: [v[0] * 1000, v[1] * 1000] for k, v in info["min_max_s"].items()},
            "parity": parity,
        }
        row["folded_vs_bound_pct"] = (med["folded"] / med["bound"] - 1) * 100
        row["folded_over_bound"] = med["folded"] / med["bound"]
        row["folded_over_unfolded"] = med["folded"] / med["unfolded"]
        row["folded_vs_unfolded_pct"] = (med["folded"] / med["unfolded"] - 1) * 100
        row["aa_pct"] = (med["bound-copy"] / med["bound"] - 1) * 100 if "bound-copy" in med else None
        entry["cpu"].append(row)
        log(f"[{name}] b{batch}: unfolded {row['unfolded_ms']:.3f} folded {row['folded_ms']:.3f} "
            f"fx {row['fx-fuse_ms'] if row['fx-fuse_ms'] is None else round(row['fx-fuse_ms'], 3)} "
            f"bound {row['bound_ms']:.3f} ms ({row['folded_vs_bound_pct']:+.1f}% vs bound, "
            f"A/A {'n/a' if row['aa_pct'] is None else format(row['aa_pct'], '+.1f')}%, "
            f"{info['clean_rounds']}/{info['rounds']} clean rounds x {info['number']} calls)")

    if args.gpu and torch.cuda.is_available():
        entry["gpu"] = bench_gpu_model(spec, variants, args, log)

    entry["loadavg_end_timing"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    if args.memory:
        entry["memory"] = measure_memory(name, args.threads)
        mem = entry["memory"]
        if "error" in mem:
            log(f"[{name}] {mem['error']}")
        else:
            fwd, warm = mem["forward_increase_kb"], mem["warm_fuse_increase_kb"]
            log(f"[{name}] memory: +{mem['fuse_increase_kb'] / 1024:.1f} MB during a cold fuse = {mem['x_params']:.2f}x "
                f"params ({mem['param_bytes'] / 2**20:.2f} MB); warm fuse: "
                f"{'?' if warm is None else f'+{warm / 1024:.1f} MB'}; one plain forward: "
                f"{'?' if fwd is None else f'+{fwd / 1024:.1f} MB'}; cold fuse {mem['cold_fuse_total_s']:.3f}s")
    return entry


def bench_gpu_model(spec: zoo.ModelSpec, variants: dict[str, nn.Module], args: argparse.Namespace,
                    log: Callable[[str], None]) -> list[dict[str, Any]]:
    rows = []
    for dtype in (torch.float32, torch.float16):
        on_gpu = {k: copy.deepcopy(m).to(device="cuda", dtype=dtype).eval() for k, m in variants.items()}
        for batch in GPU_BATCHES:
            x = input_for(spec, batch, device="cuda", dtype=dtype)
            fns = {k: (lambda m=m, x=x: m(x)) for k, m in on_gpu.items()}
            try:
                med = bench_cuda(fns, args.gpu_repeats, args.warmup)
            except Exception as exc:
                rows.append({"dtype": str(dtype), "batch": batch, "error": f"{type(exc).__name__}: {exc}"})
                continue
            row = {"dtype": str(dtype).replace("torch.", ""), "batch": batch,
                   **{f"{k}_ms": (med[k] * 1000 if k in med else None) for k in VARIANTS}}
            row["folded_vs_bound_pct"] = (med["folded"] / med["bound"] - 1) * 100
            rows.append(row)
            log(f"[{spec.name}] cuda {row['dtype']} b{batch}: unfolded {row['unfolded_ms']:.3f} folded "
                f"{row['folded_ms']:.3f} bound {row['bound_ms']:.3f} ms ({row['folded_vs_bound_pct']:+.1f}%)")
        del on_gpu
        torch.cuda.empty_cache()
    return rows


# --------------------------------------------------------------------------------------------- output

COLUMNS = ["model", "params", "batch", "unfolded ms", "folded ms", "fx-fuse ms", "lower-bound ms",
           "folded vs bound %", "fold s (discover+fold / total)", "peak mem x params", "bound A/A %"]


def fmt_params(n: int) -> str:
    if n >= 1e6:
        return f"{n / 1e6:.1f}M"
    if n >= 1e3:
        return f"{n / 1e3:.1f}k"
    return str(n)


def fmt_ms(v: float | None) -> str:
    if v is None:
        return "n/a"
    return f"{v:.3f}" if v < 10 else f"{v:.1f}"


def table_rows(entries: list[dict[str, Any]]) -> list[list[str]]:
    rows = []
    for e in entries:
        if "error" in e:
            rows.append([e["name"], fmt_params(e["params"]), "-", "error", *[""] * (len(COLUMNS) - 4)])
            continue
        ft = e["bnfold"]
        fold_s = f"{ft['discover_fold_s']:.3f} / {ft['total_s']:.3f}"
        mem = e.get("memory")
        if mem is None:
            mem_s = "-"
        elif "error" in mem:
            mem_s = "error"
        else:
            warm = mem.get("warm_x_params")
            warm_s = "" if warm is None else f", warm {warm:.2f}x"
            mem_s = f"{mem['x_params']:.2f}x{warm_s} (+{mem['fuse_increase_kb'] / 1024:.0f} MB)"
        for i, row in enumerate(e["cpu"]):
            first = i == 0
            rows.append([
                e["name"] if first else "",
                fmt_params(e["params"]) if first else "",
                str(row["batch"]),
                fmt_ms(row["unfolded_ms"]),
                fmt_ms(row["folded_ms"]),
                fmt_ms(row["fx-fuse_ms"]),
                fmt_ms(row["bound_ms"]),
                f"{row['folded_vs_bound_pct']:+.1f}" + ("*" if row.get("used_contended") else ""),
                fold_s if first else "",
                mem_s if first else "",
                "n/a" if row.get("aa_pct") is None else f"{row['aa_pct']:+.1f}",
            ])
    return rows


#: Models whose branches bnfold should merge; listed in the re-parameterisation table even if nothing merged.
REPARAM_MODELS = ("repvgg_tiny", "mobileone_tiny", "repmixer_tiny", *BENCH_SPECS)

REPARAM_COLUMNS = ["model", "input", "batch", "convs unfolded -> folded", "BNs merged / folded / left",
                   "unfolded ms", "folded ms", "lower-bound ms", "folded / bound", "bound A/A %", "folded / unfolded"]


def merges(entry: dict[str, Any]) -> int:
    return 0 if "error" in entry else entry["bnfold"]["positions"].get("merge", 0)


def reparam_rows(entries: list[dict[str, Any]]) -> list[list[str]]:
    """Models with merged branches (or expected to have some): the conv count and folded / bound per batch."""
    rows = []
    for e in entries:
        if e["name"] not in REPARAM_MODELS and not merges(e):
            continue
        if "error" in e:
            rows.append([e["name"], "", "-", "error: " + e["error"], *[""] * (len(REPARAM_COLUMNS) - 4)])
            continue
        convs = f"{e['convs']['unfolded']} -> {e['convs']['folded']}"
        bns = f"{merges(e)} / {e['bnfold']['folded']} / {e['folded_bn_like_left']} of {e['bn_like_modules']}"
        for i, row in enumerate(e["cpu"]):
            first = i == 0
            rows.append([
                e["name"] if first else "",
                e["input"] if first else "",
                str(row["batch"]),
                convs if first else "",
                bns if first else "",
                fmt_ms(row["unfolded_ms"]),
                fmt_ms(row["folded_ms"]),
                fmt_ms(row["bound_ms"]),
                f"{row['folded_over_bound']:.2f}" + ("*" if row.get("used_contended") else ""),
                "n/a" if row.get("aa_pct") is None else f"{row['aa_pct']:+.1f}",
                f"{row['folded_over_unfolded']:.2f}",
            ])
    return rows


def markdown_table(entries: list[dict[str, Any]], columns: list[str] = COLUMNS,
                   rows_of: Callable[[list[dict[str, Any]]], list[list[str]]] = table_rows) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join(["---"] * len(columns)) + "|"]
    for r in rows_of(entries):
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in r) + " |")
    return "\n".join(lines)


def print_table(entries: list[dict[str, Any]], columns: list[str] = COLUMNS,
                rows_of: Callable[[list[dict[str, Any]]], list[list[str]]] = table_rows,
                title: str = "bnfold fuse (CPU eager, median ms per call)") -> None:
    rows = rows_of(entries)
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print(title)
        widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(columns)]
        print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
        for r in rows:
            print("  ".join(c.ljust(w) for c, w in zip(r, widths)))
        return
    table = Table(title=title)
    for i, c in enumerate(columns):
        table.add_column(c, justify="left" if i == 0 else "right")
    for r in rows:
        table.add_row(*r)
    Console(width=max(160, os.get_terminal_size(1).columns if sys.stdout.isatty() else 160)).print(table)


def print_gpu_table(entries: list[dict[str, Any]]) -> None:
    print("\nGPU (CUDA events, median ms per call)")
    print(f"{'model':<20} {'dtype':<8} {'batch':>5} {'unfolded':>10} {'folded':>10} {'fx-fuse':>10} {'bound':>10} {'vs bound %':>10}")
    for e in entries:
        for row in e.get("gpu", []):
            if "error" in row:
                print(f"{e['name']:<20} {row['dtype']:<8} {row['batch']:>5} error: {row['error']}")
                continue
            print(f"{e['name']:<20} {row['dtype']:<8} {row['batch']:>5} {fmt_ms(row['unfolded_ms']):>10} "
                  f"{fmt_ms(row['folded_ms']):>10} {fmt_ms(row['fx-fuse_ms']):>10} {fmt_ms(row['bound_ms']):>10} "
                  f"{row['folded_vs_bound_pct']:>+10.1f}")


def summarise(entries: list[dict[str, Any]]) -> list[str]:
    lines = []
    for e in entries:
        if "error" in e:
            lines.append(f"{e['name']}: {e['error']}")
            continue
        b = e["bnfold"]
        if not b["ok"]:
            lines.append(f"{e['name']}: bnfold parity check FAILED")
        for s in b["skipped"]:
            lines.append(f"{e['name']}: skipped {s['bn']}: {s['reason']}")
        for row in e["cpu"]:
            if row["folded_vs_bound_pct"] > TARGET_BOUND_PCT:
                aa = "" if row.get("aa_pct") is None else f", A/A control {row['aa_pct']:+.1f}%"
                lines.append(f"{e['name']} b{row['batch']}: folded is {row['folded_vs_bound_pct']:+.1f}% vs bound "
                             f"(target <= {TARGET_BOUND_PCT:.0f}%{aa})")
            for label, p in row["parity"].items():
                if p["max_abs_diff"] > 1e-3 * max(1.0, p["max_abs_ref"]):
                    lines.append(f"{e['name']} b{row['batch']}: {label} differs from unfolded by "
                                 f"{p['max_abs_diff']:.2e} (max |out| {p['max_abs_ref']:.2e})")
        if e["name"] in REPARAM_MODELS and not merges(e):
            lines.append(f"{e['name']}: bnfold merged no branches (positions {b['positions']})")
        if merges(e):
            for row in e["cpu"]:
                verdict = "faster than" if row["folded_over_bound"] < 1 else "NOT faster than"
                lines.append(f"{e['name']} b{row['batch']}: folded (merged branches, {e['convs']['unfolded']} -> "
                             f"{e['convs']['folded']} convs) is {verdict} the lower bound: folded / bound = "
                             f"{row['folded_over_bound']:.2f}")
        if e["name"] == "resnet50" and b["discover_fold_s"] > TARGET_FOLD_S:
            lines.append(f"resnet50: discover+fold {b['discover_fold_s']:.3f}s > {TARGET_FOLD_S}s target")
        mem = e.get("memory") or {}
        if mem.get("x_params", 0) > TARGET_MEM_X and e["param_bytes"] > 10 * 2**20:
            warm = mem.get("warm_x_params")
            lines.append(f"{e['name']}: fuse peak memory {mem['x_params']:.2f}x params cold"
                         + ("" if warm is None else f", {warm:.2f}x warm") + f" (target < {TARGET_MEM_X}x)")
        for row in e["cpu"]:
            if row.get("used_contended"):
                lines.append(f"{e['name']} b{row['batch']}: (*) too few uncontended rounds "
                             f"({row['clean_rounds']}/{row['rounds']}); other processes were using the CPU")
    return lines


# --------------------------------------------------------------------------------------------- main


def bnfold_files() -> list[Path]:
    """Every source file of the bnfold package (``import bnfold`` is lazy: at start-up only ``__init__`` is
    imported, so hashing the imported modules alone would not see a change in the rest)."""
    return sorted(Path(bnfold.__file__).parent.rglob("*.py"))


def source_state(files: list[Path] | None = None) -> dict[str, Any]:
    """Which bnfold is measured: git commit, whether bnfold/ has local changes, and a hash of the imported sources."""
    import hashlib

    digest = hashlib.sha256()
    for path in files if files is not None else bnfold_files():
        digest.update(str(path).encode())
        digest.update(path.read_bytes() if path.exists() else b"<missing>")
    state: dict[str, Any] = {"bnfold_source_sha256": digest.hexdigest()[:16]}
    try:
        def run(*a: str) -> str:
            return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()

        state["git_commit"] = run("rev-parse", "--short", "HEAD") or None
        state["bnfold_dirty"] = bool(run("status", "--porcelain", "--", "bnfold"))
    except (OSError, subprocess.SubprocessError):
        pass
    return state


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="",
                   help="comma-separated model names: zoo models, resnet50, or the bench-sized " + ", ".join(BENCH_SPECS)
                        + " (default: all of them)")
    p.add_argument("--repeats", type=int, default=30, help="measurement rounds per model and batch (default 30)")
    p.add_argument("--max-case-s", type=float, default=25.0,
                   help="cap on seconds per model/batch; slow models (resnet50) get fewer rounds (default 25)")
    p.add_argument("--min-rounds", type=int, default=7, help="never fewer rounds than this (default 7)")
    p.add_argument("--sample-ms", type=float, default=10.0,
                   help="each sample times enough consecutive calls to last about this long (default 10)")
    p.add_argument("--warmup", type=int, default=3, help="warm-up calls per variant (default 3)")
    p.add_argument("--fuse-repeats", type=int, default=3, help="bnfold.fuse calls per model; the fastest is reported (default 3)")
    p.add_argument("--quiet-wait-s", type=float, default=30.0,
                   help="before each measurement, wait up to this long for other processes to leave the CPU (default 30)")
    p.add_argument("--budget-s", type=float, default=420.0,
                   help="after this many seconds, stop waiting for a quiet machine and re-measuring (default 420)")
    p.add_argument("--retries", type=int, default=2,
                   help="re-measure a model/batch this many times when other processes spoiled most rounds (default 2)")
    p.add_argument("--no-control", dest="control", action="store_false",
                   help="skip the A/A control (a second copy of the lower-bound model, timed like the others)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch.set_num_threads")
    p.add_argument("--json", dest="json_path", default=None, help="write machine-readable results here")
    p.add_argument("--markdown", default=None, help="write the table as markdown here")
    p.add_argument("--no-memory", dest="memory", action="store_false", help="skip the peak-memory subprocesses")
    p.add_argument("--no-gpu", dest="gpu", action="store_false", help="skip GPU figures even if CUDA is available")
    p.add_argument("--gpu-repeats", type=int, default=30, help="GPU rounds (default 30)")
    p.add_argument("--_memory-child", dest="memory_child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--_memory-mode", dest="memory_mode", default="fuse", choices=("fuse", "fuse-warm", "forward"),
                   help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.memory_child:
        print("@@MEM@@" + json.dumps(memory_child(args.memory_child, args.memory_mode)), flush=True)
        return 0

    names = ([n.strip() for n in args.models.split(",") if n.strip()]
             or [*zoo.REFERENCE_MODELS, zoo.RESNET50.name, *BENCH_SPECS])
    for n in names:
        get_spec(n)  # fail early on unknown names

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    machine = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
        "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        **source_state(),
    }
    measured_files = bnfold_files()
    log(f"torch {machine['torch']}, {machine['cpu_count']} CPUs, {machine['threads']} threads; models: {', '.join(names)}")
    if not torch.cuda.is_available():
        log("GPU figures skipped: torch.cuda.is_available() is False")
    elif not args.gpu:
        log("GPU figures skipped: --no-gpu")

    start = time.perf_counter()
    entries = []
    for name in names:
        if args.quiet_wait_s and time.perf_counter() - start > args.budget_s:
            log(f"over the {args.budget_s:.0f}s budget: no more waiting for other processes or re-measuring")
            args.quiet_wait_s, args.retries = 0.0, 0
        entries.append(bench_model(name, args, log))
    elapsed = time.perf_counter() - start
    if source_state(measured_files)["bnfold_source_sha256"] != machine["bnfold_source_sha256"]:
        machine["bnfold_changed_during_run"] = True
        log("WARNING: bnfold's source changed while the benchmark ran; figures may mix versions. Run it again.")

    print()
    print_table(entries)
    if reparam_rows(entries):
        print()
        print_table(entries, REPARAM_COLUMNS, reparam_rows,
                    "Re-parameterisable models: merged branches vs the lower bound (which keeps every branch); "
                    "folded / bound < 1 = faster than the bound")
    if any(e.get("gpu") for e in entries):
        print_gpu_table(entries)
    else:
        print("GPU figures skipped: " + ("CUDA not available" if not torch.cuda.is_available() else "--no-gpu"))
    notes = summarise(entries)
    print("(*) median includes rounds during which other processes used the CPU. Memory: cold = first fuse in a "
          "fresh process, warm = after fusing a tiny model first; tiny models' ratios are dominated by fixed costs.")
    if notes:
        print("\nNotes:")
        for line in notes:
            print(f"  - {line}")
    print(f"\nTotal benchmark time: {elapsed:.1f}s")

    if args.markdown:
        Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
        text = markdown_table(entries)
        if reparam_rows(entries):
            text += "\n\n" + markdown_table(entries, REPARAM_COLUMNS, reparam_rows)
        Path(args.markdown).write_text(text + "\n")
    if args.json_path:
        Path(args.json_path).parent.mkdir(parents=True, exist_ok=True)
        payload = {"command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
                   "machine": machine, "args": {k: v for k, v in vars(args).items() if not k.startswith("memory_")},
                   "elapsed_s": elapsed, "models": entries, "notes": notes}
        Path(args.json_path).write_text(json.dumps(payload, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
