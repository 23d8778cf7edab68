#!/usr/bin/env python
"""Benchmark bnfold's ONNX folding: BatchNorm left, parity, fp16 error, fold and export time.

Five tables:

1. **BatchNorm left and parity**, per reference model (``models.zoo.REFERENCE_MODELS``) and exporter:
   the eval model exported by the TorchScript exporter (``torch.onnx.export(dynamo=False)``, torch's default
   ``do_constant_folding=True``, which also folds Conv+BN) and by the dynamo exporter (``dynamo=True``, torch's
   default ``optimize=True``, which runs onnxscript's optimizer), both through ``bnfold.onnx.export.export_onnx``
   (symbolic batch). Each exported graph is then handed, separately, to

   * ``ort-basic``: onnxruntime at ``ORT_ENABLE_BASIC`` with ``optimized_model_filepath`` (the optimised graph
     saved offline, as a deployment would ship it);
   * ``ort-extended``: the same at ``ORT_ENABLE_EXTENDED`` (adds onnxruntime's contrib fusions, e.g. FusedConv;
     the saved graph then needs onnxruntime to run);
   * ``onnxscript``: ``onnxscript.optimizer.optimize`` (constant folding plus onnxscript's default rewrite rules,
     which include ``fuse_batchnorm`` into Conv, ConvTranspose and Gemm);
   * ``onnxslim``: ``onnxslim.slim`` with its defaults (constant folding and its fusion patterns, Conv+BN among
     them); optional: "n/a" when ``onnxslim`` is not installed (it is not a bnfold dependency);
   * ``bnfold``: ``bnfold.onnx.fold.fold_graph``.

   For each graph: the ``BatchNormalization`` nodes left, and parity with the PyTorch eval model, the largest
   ``|onnx - torch|`` over every output element divided by the largest ``|torch|`` (the output's scale), with
   onnxruntime's graph optimisations disabled (its own fusions would otherwise hide what the graph holds).

2. **fp16 error** for a few models: the same error measure, of float16 graphs against the **float32** eval
   model, on inputs rounded to float16 (so input rounding is not counted): the exporters' own fp16 graphs
   (TorchScript with constant folding; dynamo); the *unfolded* fp16 graph (TorchScript, ``do_constant_folding=
   False``, every BN kept) as it is and after ort-basic, onnxscript and ``fold_graph``; and ``bnfold export
   --fp16`` (``bnfold.export.export(..., fp16=True)``: folded in float64 from the fp32 weights in PyTorch, cast to
   float16 once, exported by the default exporter).

3. **Folding a ResNet-50-size ONNX file**: ``zoo``'s ResNet-50 exported once (TorchScript exporter,
   ``do_constant_folding=False`` so its 53 BNs stay); then, in a fresh process each,
   ``load_onnx + fold_graph + save_onnx`` (and, for comparison, ``onnx.load + onnxscript optimize + onnx.save``
   and onnxruntime's basic level saved offline) three times: the fastest wall time, the first (cold) one, and
   the rise of the RSS high-water mark (``VmHWM``, reset just before each run) over the file's size.

4. **``bnfold export`` of the ResNet-50** with the default exporter, once each: ``bnfold.export.export(model,
   (x,), out)`` in this process (imports done, model built), and the command line in a fresh process
   (``python -m bnfold.cli export STATE_DICT --arch models.zoo:resnet50 --input-shape 1,3,224,224``, end to end:
   process start, imports and loading included); wall time and the stage timings ``result.timings`` reports.

5. **onnxruntime latency, exported vs bnfold-folded vs the BN->Identity bound** (``--latency-models``; by default
   the re-parameterisation models: the zoo's ``repvgg_tiny`` ... ``repmixer_tiny`` and the bench-sized
   RepVGG / MobileOne of ``scripts/bench_fuse.py``). For each exporter (``torchscript`` and ``dynamo`` as above, and
   ``unfolded``: TorchScript with ``do_constant_folding=False``, every BN in the graph), three graphs run in
   onnxruntime at its default level (``ORT_ENABLE_ALL``, as a deployment would run them, so onnxruntime's own
   Conv+BN fusion applies to all of them), ``--threads`` intra-op threads without spin-waiting (the sessions are
   timed interleaved; a spinning pool would take the cores from the next session), at batch 1 and 8:

   * ``exported``: the exporter's file as it is;
   * ``bnfold``: ``fold_graph`` of that file;
   * ``bound``: that file with every ``BatchNormalization`` node replaced by ``Identity``. Not equivalent to the
     model; it keeps every branch and every conv, so it bounds what *folding BNs away* can reach. Where bnfold
     merges branches into one conv (RepVGG / MobileOne), ``bnfold`` can run faster than the bound: the table gives
     ``bnfold / bound`` (< 1: faster).
   * ``bound A/A``: a second session of the bound, timed the same way (the noise floor; ``--no-control`` drops it).

   Timed like ``bench_fuse.py`` (its ``bench_cpu``): interleaved rounds, median per variant, rounds during which
   other processes used the CPU replaced. Parity: the largest ``|bnfold - torch|`` at that batch (onnxruntime
   optimisations off) and the same over the largest ``|torch|``.

The ResNet-50 figures wait for other processes to leave the CPU first (the machine may be shared), record the share
of the CPU other processes took while they ran ("other load"), and are measured again (up to ``--retries`` times,
the least disturbed run kept) when that share passes 15%: on 2 cores a second busy process slows torch's thread
pool many times over (an audit of 2 s took 35 s).

Only measurement lives here; the folding is bnfold's, onnxruntime's, onnxscript's and onnxslim's.

Usage::

    python scripts/bench_onnx.py                               # everything, about 3 minutes on 2 cores
    python scripts/bench_onnx.py --models resnet_tiny,mlp_tiny --no-resnet50 --markdown /tmp/onnx.md
    python scripts/bench_onnx.py --models repvgg_tiny --fp16-models "" --no-resnet50 --latency-models repvgg_w64_112
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
import onnxscript  # noqa: E402
import torch  # noqa: E402

from bnfold.compare import flatten_outputs  # noqa: E402
from bnfold.onnx.export import captured_output, export_onnx  # noqa: E402
from bnfold.onnx.fold import fold_graph  # noqa: E402
from bnfold.onnx.io import load_onnx, save_onnx  # noqa: E402
from models import zoo  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
# Waiting for a quiet CPU, the RSS peak, CPU timing, and the bench-sized models of table 5.
from bench_fuse import (  # noqa: E402
    BENCH_SPECS,
    MONITOR,
    bench_cpu,
    build,
    get_spec,
    maxrss_kb,
    reset_peak_rss,
    source_state,
)

try:  # optional: not a bnfold dependency
    import onnxslim  # noqa: E402
except ImportError:
    onnxslim = None

EXPORTERS = ("torchscript", "dynamo")
VARIANTS = ("exporter", "ort-basic", "ort-extended", "onnxscript", "onnxslim", "bnfold")
FP16_MODELS = ("efficientnet_tiny", "mobilenet_tiny", "resnet_tiny")
FP16_BATCH = 16  # more output elements than the example batch: a steadier max and mean
FP16_VARIANTS = ("torchscript", "dynamo", "unfolded", "ort-basic", "onnxscript", "bnfold fold_graph",
                 "bnfold export --fp16")
TARGET_FOLD_S = 1.0
TARGET_MEM_X = 2.0
TARGET_EXPORT_S = 30.0
MAX_OTHER_LOAD = 0.15  # share of the CPU other processes may take during a ResNet-50 measurement
#: Table 5's default models: the re-parameterisation zoo models and the bench-sized RepVGG / MobileOne.
LATENCY_MODELS = ("repvgg_tiny", "mobileone_tiny", "mixconv_tiny", "residual_bn_tiny", "same_pad_tiny",
                  "reparam_negatives_tiny", "repmixer_tiny", *BENCH_SPECS)
LATENCY_EXPORTERS = ("torchscript", "dynamo", "unfolded")
LATENCY_BATCHES = (1, 8)
LATENCY_VARIANTS = ("exported", "bnfold", "bound", "bound A/A")
RTOL = {"float32": 1e-4, "float16": 1e-2}  # bnfold's default rtol per dtype: an error above it is flagged "!"
SEED = 0


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def first_line(exc: BaseException, limit: int = 160) -> str:
    text = re.sub(r"\x1b\[[0-9;]*m", "", (str(exc).strip().splitlines() or [""])[0])  # no terminal colours
    return f"{type(exc).__name__}: {text[:limit]}"


# --------------------------------------------------------------------------------------------- graphs


def count_bn(model: onnx.ModelProto) -> int:
    """BatchNormalization nodes in the graph, its subgraphs and its functions."""
    def in_graph(graph: onnx.GraphProto) -> int:
        n = 0
        for node in graph.node:
            n += node.op_type == "BatchNormalization"
            for attr in node.attribute:
                n += sum(in_graph(g) for g in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else attr.graphs))
        return n
    return in_graph(model.graph) + sum(n.op_type == "BatchNormalization" for f in model.functions for n in f.node)


def bn_modules(model: torch.nn.Module) -> int:
    """Modules that own running statistics (zoo's definition of BatchNorm-like); functional BNs not counted."""
    return sum(isinstance(getattr(m, "running_mean", None), torch.Tensor)
               and isinstance(getattr(m, "running_var", None), torch.Tensor) for m in model.modules())


def torch_export(model: torch.nn.Module, x: torch.Tensor, path: Path, exporter: str) -> float:
    """The exporter alone, as bnfold calls it (torch's defaults, symbolic batch); seconds."""
    with torch.no_grad():
        out = model(x)
    t0 = time.perf_counter()
    export_onnx(model, (x,), out, path, exporter)
    return time.perf_counter() - t0


def torchscript_unfolded(model: torch.nn.Module, x: torch.Tensor, path: Path) -> None:
    """TorchScript export with ``do_constant_folding=False``: the exporter's own Conv+BN fusion is off."""
    with captured_output(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), str(path), dynamo=False, do_constant_folding=False,
                          input_names=["input_0"], dynamic_axes={"input_0": {0: "batch"}})


def ort_basic(src: Path, dst: Path, level: str = "ORT_ENABLE_BASIC") -> float:
    """onnxruntime at ``level`` (basic by default), the optimised graph saved to ``dst``; seconds (session creation
    included)."""
    so = ort.SessionOptions()
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
    so.optimized_model_filepath = str(dst)
    t0 = time.perf_counter()
    ort.InferenceSession(str(src), so, providers=["CPUExecutionProvider"])
    return time.perf_counter() - t0


def run_plain(model: onnx.ModelProto | Path, x: np.ndarray) -> list[np.ndarray]:
    """Outputs of onnxruntime with every graph optimisation disabled."""
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    source = str(model) if isinstance(model, Path) else model.SerializeToString()
    sess = ort.InferenceSession(source, so, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})


def torch_outputs(model: torch.nn.Module, x: torch.Tensor) -> list[np.ndarray]:
    with torch.no_grad():
        out = model(x)
    return [t.detach().double().numpy() for t in flatten_outputs(out).values() if isinstance(t, torch.Tensor)]


def rel_errors(reference: list[np.ndarray], got: list[np.ndarray]) -> tuple[float, float]:
    """(max, mean) of |got - reference| over all output elements, divided by max |reference| (the output scale);
    inf when the shapes differ or a value is not finite."""
    if len(reference) != len(got):
        return float("inf"), float("inf")
    diffs, scale = [], 0.0
    for r, g in zip(reference, got):
        g = np.asarray(g, dtype=np.float64)
        if r.shape != g.shape:
            return float("inf"), float("inf")
        d = np.abs(g - r).ravel()
        if not np.all(np.isfinite(d)):
            return float("inf"), float("inf")
        diffs.append(d)
        scale = max(scale, float(np.abs(r).max(initial=0.0)))
    d = np.concatenate(diffs) if diffs else np.zeros(1)
    scale = scale or 1.0
    return float(d.max(initial=0.0)) / scale, float(d.mean()) / scale


def rel_error(reference: list[np.ndarray], got: list[np.ndarray]) -> float:
    """max |got - reference| / max |reference| over all outputs (see :func:`rel_errors`)."""
    return rel_errors(reference, got)[0]


def input_for(spec: zoo.ModelSpec, batch: int | None = None) -> torch.Tensor:
    g = torch.Generator().manual_seed(SEED)
    shape = spec.input_shape if batch is None else (batch, *spec.input_shape[1:])
    return torch.randn(shape, generator=g)


def attempt(label: str, problems: dict[str, str], fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)``, or None with the reason in ``problems[label]``: a tool refusing a graph is a result."""
    try:
        return fn(*args)
    except Exception as exc:  # noqa: BLE001 - the exporters and tools raise anything
        problems[label] = first_line(exc)
        return None


def via_ort_basic(src: Path) -> tuple[onnx.ModelProto, float, dict[str, Any]]:
    dst = src.with_name(f"{src.stem}.ort-basic.onnx")
    seconds = ort_basic(src, dst)
    return onnx.load(str(dst)), seconds, {}


def via_ort_extended(src: Path) -> tuple[onnx.ModelProto, float, dict[str, Any]]:
    dst = src.with_name(f"{src.stem}.ort-extended.onnx")
    seconds = ort_basic(src, dst, "ORT_ENABLE_EXTENDED")
    return onnx.load(str(dst)), seconds, {}


def via_onnxslim(src: Path) -> tuple[onnx.ModelProto, float, dict[str, Any]]:
    model = onnx.load(str(src))
    t0 = time.perf_counter()
    with captured_output():
        slimmed = onnxslim.slim(model)
    return slimmed, time.perf_counter() - t0, {}


def via_onnxscript(src: Path) -> tuple[onnx.ModelProto, float, dict[str, Any]]:
    model = onnx.load(str(src))
    t0 = time.perf_counter()
    with captured_output():
        optimized = onnxscript.optimizer.optimize(model)
    return optimized, time.perf_counter() - t0, {}


def via_bnfold(src: Path) -> tuple[onnx.ModelProto, float, dict[str, Any]]:
    model = load_onnx(src)
    t0 = time.perf_counter()
    result = fold_graph(model)
    seconds = time.perf_counter() - t0
    return result.model, seconds, {"folded": len(result.folded),
                                   "skipped": [{"bn": s.bn, "reason": s.reason} for s in result.skipped]}


#: Each takes an exported file and returns (its graph after the tool, seconds, details).
GRAPH_TOOLS: dict[str, Callable[[Path], tuple[onnx.ModelProto, float, dict[str, Any]]]] = {
    "ort-basic": via_ort_basic, "ort-extended": via_ort_extended, "onnxscript": via_onnxscript,
    **({"onnxslim": via_onnxslim} if onnxslim is not None else {}), "bnfold": via_bnfold}


# --------------------------------------------------------------------------------------------- table 1


def bench_variants(exported: Path, reference: list[np.ndarray], x: np.ndarray) -> dict[str, Any]:
    """BN left, parity and time of the exported graph and of each tool applied to it."""
    row: dict[str, Any] = {"time_s": {}, "errors": {}, "bn_left": {}, "rel_err": {}}
    graphs = {"exporter": onnx.load(str(exported))}
    for tool, via in GRAPH_TOOLS.items():
        got = attempt(tool, row["errors"], via, exported)
        if got is not None:
            graphs[tool], row["time_s"][tool], details = got
            if tool == "bnfold":
                row["bnfold_folded"], row["bnfold_skipped"] = details["folded"], details["skipped"]
    for name, graph in graphs.items():
        row["bn_left"][name] = count_bn(graph)
        err = attempt(f"{name} run", row["errors"], lambda g=graph: rel_error(reference, run_plain(g, x)))
        if err is not None:
            row["rel_err"][name] = err
    return row


def bench_model(name: str, exporters: tuple[str, ...], workdir: Path) -> dict[str, Any]:
    spec = get_spec(name)
    model = build(name)
    x = input_for(spec)
    reference = torch_outputs(model, x)
    entry: dict[str, Any] = {"name": name, "bn_modules": bn_modules(model), "rows": {}}
    for exporter in exporters:
        path = workdir / f"{name}.{exporter}.onnx"
        problems: dict[str, str] = {}
        export_s = attempt("export", problems, torch_export, model, x, path, exporter)
        if export_s is None:
            entry["rows"][exporter] = {"export_error": problems["export"]}
            log(f"[{name}] {exporter}: export failed: {problems['export']}")
            continue
        row = bench_variants(path, reference, x.numpy())
        row["export_s"] = export_s
        entry["rows"][exporter] = row
        log(f"[{name}] {exporter}: export {export_s:.2f}s, BN left {row['bn_left']}, "
            f"rel err { {k: f'{v:.1e}' for k, v in row['rel_err'].items()} }"
            + (f", errors {row['errors']}" if row["errors"] else ""))
    return entry


# --------------------------------------------------------------------------------------------- table 2


def bench_fp16(name: str, workdir: Path, bnfold_exporter: str) -> dict[str, Any]:
    from bnfold.export import export as bnfold_export

    spec = zoo.get_spec(name)
    model = zoo.build(name)
    x16 = input_for(spec, FP16_BATCH).half()
    reference = torch_outputs(model, x16.float())  # the fp32 eval model, on the same (fp16-rounded) input
    half = copy.deepcopy(model).half().eval()
    errs: dict[str, tuple[float, float]] = {}
    bns: dict[str, int] = {}
    problems: dict[str, str] = {}

    def measure(label: str, graph: onnx.ModelProto | Path | None) -> None:
        if graph is None:
            return
        proto = onnx.load(str(graph)) if isinstance(graph, Path) else graph
        bns[label] = count_bn(proto)
        got = attempt(label, problems, lambda: rel_errors(reference, run_plain(proto, x16.numpy())))
        if got is not None:
            errs[label] = got

    def exported(exporter: str) -> Path:
        path = workdir / f"{name}.fp16.{exporter}.onnx"
        torch_export(half, x16, path, exporter)
        return path

    for exporter in EXPORTERS:
        measure(exporter, attempt(exporter, problems, exported, exporter))
    unfolded = workdir / f"{name}.fp16.unfolded.onnx"
    torchscript_unfolded(half, x16, unfolded)
    measure("unfolded", unfolded)
    for tool, label in (("ort-basic", "ort-basic"), ("onnxscript", "onnxscript"), ("bnfold", "bnfold fold_graph")):
        got = attempt(label, problems, GRAPH_TOOLS[tool], unfolded)
        measure(label, None if got is None else got[0])

    def bnfold_export_fp16() -> Path | None:
        out = workdir / f"{name}.fp16.bnfold-export.onnx"
        with captured_output():
            result = bnfold_export(model, (x16.float(),), out, exporter=bnfold_exporter, fp16=True)
        if result.output is None:
            raise RuntimeError(f"stopped at {result.stopped}: {'; '.join(result.notes)[:200]}")
        return out

    measure("bnfold export --fp16", attempt("bnfold export --fp16", problems, bnfold_export_fp16))
    log(f"[{name}] fp16 rel err vs fp32 (max, mean): { {k: f'{v[0]:.1e}, {v[1]:.1e}' for k, v in errs.items()} }, "
        f"BN left {bns}" + (f", problems {problems}" if problems else ""))
    return {"name": name, "rel_err": errs, "bn_left": bns, "problems": problems}


# --------------------------------------------------------------------------------------------- table 3 (child)


class Stages:
    """Seconds and the RSS high-water mark (KiB above the start) at the end of each stage of one run."""

    def __init__(self) -> None:
        self.base = maxrss_kb()
        self.last = time.perf_counter()
        self.record: dict[str, float] = {}

    def mark(self, stage: str) -> None:
        now = time.perf_counter()
        self.record[f"{stage}_s"] = now - self.last
        self.record[f"{stage}_peak_kb"] = maxrss_kb() - self.base
        self.last = now


def _bnfold_fold_file(src: Path, dst: Path, stages: Stages) -> None:
    model = load_onnx(src)
    stages.mark("load")
    folded = fold_graph(model)
    stages.mark("fold")
    save_onnx(folded.model, dst)
    stages.mark("save")


def _onnxscript_file(src: Path, dst: Path, stages: Stages) -> None:
    model = onnx.load(str(src))
    stages.mark("load")
    optimized = onnxscript.optimizer.optimize(model)
    stages.mark("fold")
    onnx.save(optimized, str(dst))
    stages.mark("save")


def _ort_basic_file(src: Path, dst: Path, stages: Stages) -> None:
    ort_basic(src, dst)
    stages.mark("fold")


FILE_TOOLS: dict[str, tuple[str, Callable[[Path, Path, Stages], None]]] = {
    "bnfold": ("bnfold load_onnx + fold_graph + save_onnx", _bnfold_fold_file),
    "onnxscript": ("onnx.load + onnxscript optimize + onnx.save", _onnxscript_file),
    "ort-basic": ("onnxruntime basic level, saved offline", _ort_basic_file),
}


def fold_file_child(tool: str, src: Path, dst: Path, repeats: int) -> dict[str, Any]:
    """Runs in a fresh process (imports done): the tool on ``src`` ``repeats`` times, each timed, with the RSS
    high-water mark reset before each run (so each run's rise is its own)."""
    runs = []
    for _ in range(repeats):
        gc.collect()
        reset = reset_peak_rss()
        stages = Stages()
        t0 = time.perf_counter()
        FILE_TOOLS[tool][1](src, dst, stages)
        runs.append({"wall_s": time.perf_counter() - t0, "peak_rise_kb": maxrss_kb() - stages.base,
                     "peak_reset": reset, **stages.record})
        del stages
        gc.collect()
    return {"tool": tool, "runs": runs}


class OtherLoad:
    """The share of the machine's CPU time that processes other than this one and its children used while the
    block ran (from /proc/stat): figures measured while it is high are slower than on a quiet machine."""

    @staticmethod
    def _busy_ticks() -> int | None:
        try:
            with open("/proc/stat") as f:
                fields = [int(v) for v in f.readline().split()[1:]]
            return sum(fields) - fields[3] - (fields[4] if len(fields) > 4 else 0)
        except (OSError, ValueError, IndexError):
            return None

    def __enter__(self) -> OtherLoad:
        self.share: float | None = None
        self.t0, self.busy0, self.own0 = time.perf_counter(), self._busy_ticks(), os.times()
        return self

    def __exit__(self, *exc: object) -> None:
        busy, own, wall = self._busy_ticks(), os.times(), time.perf_counter() - self.t0
        if busy is None or self.busy0 is None or wall <= 0:
            return
        hz = os.sysconf("SC_CLK_TCK")
        mine = sum(getattr(own, k) - getattr(self.own0, k)
                   for k in ("user", "system", "children_user", "children_system")) * hz
        self.share = max(0.0, (busy - self.busy0) - mine) / (wall * hz * (os.cpu_count() or 1))


def _python_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def run_python(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], check=False, capture_output=True, text=True, cwd=str(ROOT),
                          env=_python_env(), timeout=900)


def measured(run: Callable[[], dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    """``run()`` after waiting (up to ``--quiet-wait-s``) for other processes to leave the CPU, with the share of the
    CPU they took meanwhile; repeated up to ``--retries`` times while that share is over ``MAX_OTHER_LOAD``, and the
    least disturbed run kept. On 2 cores a second busy process slows torch's thread pool many times over. Past
    ``args.deadline`` (``--budget-s``), no more waiting and no retries."""
    kept: dict[str, Any] | None = None
    for attempt_no in range(args.retries + 1):
        if attempt_no and time.perf_counter() > args.deadline:
            log("  over the --budget-s time budget: no more retries")
            break
        MONITOR.wait_for_quiet(args.quiet_wait_s if time.perf_counter() < args.deadline else 0.0)
        with OtherLoad() as load:
            result = run()
        result.update(other_load=load.share, attempts=attempt_no + 1)
        if kept is None or (load.share or 0.0) < (kept["other_load"] or 0.0):
            kept = result
        if (load.share or 0.0) <= MAX_OTHER_LOAD:
            break
        log(f"  other processes used {fmt_load(load.share)} of the CPU: measuring again")
    assert kept is not None
    return kept


def run_fold_child(tool: str, src: Path, dst: Path, repeats: int, threads: int) -> dict[str, Any]:
    proc = run_python([str(Path(__file__).resolve()), "--_fold-child", tool, str(src), str(dst),
                       "--repeats", str(repeats), "--threads", str(threads)])
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("@@FOLD@@"):
            return json.loads(line[len("@@FOLD@@"):])
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return {"tool": tool, "error": f"child failed (rc {proc.returncode}): {tail}"}


def bench_resnet50_fold(workdir: Path, args: argparse.Namespace) -> dict[str, Any]:
    name = zoo.RESNET50.name
    model = zoo.build(name)
    x = input_for(zoo.RESNET50)
    src = workdir / "resnet50.unfolded.onnx"
    torchscript_unfolded(model, x, src)
    reference = torch_outputs(model, x)
    out: dict[str, Any] = {"file_bytes": src.stat().st_size, "bn_in_file": count_bn(onnx.load(str(src))),
                           "tools": []}
    log(f"[resnet50] exported {src.stat().st_size / 2**20:.1f} MB with {out['bn_in_file']} BatchNormalization")
    for tool in FILE_TOOLS:
        dst = workdir / f"resnet50.{tool}.onnx"
        res = measured(lambda t=tool, d=dst: run_fold_child(t, src, d, args.repeats, args.threads), args)
        if "error" not in res:
            graph = onnx.load(str(dst))
            res["bn_left"] = count_bn(graph)
            res["rel_err"] = rel_error(reference, run_plain(graph, x.numpy()))
            best = min(res["runs"], key=lambda r: r["wall_s"])
            log(f"[resnet50] {tool}: best {best['wall_s']:.3f}s of {args.repeats}, "
                f"cold {res['runs'][0]['wall_s']:.3f}s, "
                f"peak +{res['runs'][0]['peak_rise_kb'] / 1024:.0f} MB, BN left {res['bn_left']}, "
                f"rel err {res['rel_err']:.1e}; runs {res['runs']}")
        else:
            log(f"[resnet50] {tool}: {res['error']}")
        out["tools"].append(res)
    return out


# --------------------------------------------------------------------------------------------- table 4


def api_export(model: torch.nn.Module, x: torch.Tensor, out: Path) -> dict[str, Any]:
    from bnfold.export import export as bnfold_export

    problems: dict[str, str] = {}
    t0 = time.perf_counter()
    with captured_output():
        result = attempt("export", problems, bnfold_export, model, (x,), out)
    row: dict[str, Any] = {"how": "API: bnfold.export.export, warm process", "wall_s": time.perf_counter() - t0}
    if result is None:
        row.update(ok=False, error=problems["export"])
    else:
        row.update(ok=result.ok, exporter=result.exporter, timings=dict(result.timings), left=len(result.left),
                   graph_folded=len(result.graph_folded))
    return row


def cli_export(state: Path, out: Path, report: Path) -> dict[str, Any]:
    t0 = time.perf_counter()
    proc = run_python(["-m", "bnfold.cli", "export", str(state), "--arch", "models.zoo:resnet50",
                       "--input-shape", "1,3,224,224", "-o", str(out), "--json", str(report), "-q"])
    row: dict[str, Any] = {"how": "CLI: bnfold export, fresh process", "wall_s": time.perf_counter() - t0,
                           "rc": proc.returncode}
    if report.exists():
        doc = json.loads(report.read_text())
        row.update(ok=doc.get("ok"), exporter=doc.get("exporter"), timings=doc.get("timings") or {},
                   left=len(doc.get("left") or []), graph_folded=len(doc.get("graph_folded") or []))
    else:
        row["ok"] = False
        row["error"] = (proc.stderr.strip().splitlines() or proc.stdout.strip().splitlines() or ["no output"])[-1]
    return row


def bench_export(workdir: Path, args: argparse.Namespace) -> list[dict[str, Any]]:
    """``bnfold export`` of the ResNet-50, default exporter: through the API in this process (imports and the
    model already there), then through the command line in a fresh process (end to end)."""
    from safetensors.torch import save_file

    model = zoo.build(zoo.RESNET50.name)
    x = torch.randn(zoo.RESNET50.input_shape, generator=torch.Generator().manual_seed(SEED))
    state = workdir / "resnet50.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(state))
    runs = [(lambda: api_export(model, x, workdir / "resnet50.api.onnx"), workdir / "resnet50.api.onnx"),
            (lambda: cli_export(state, workdir / "resnet50.cli.onnx", workdir / "resnet50.cli.json"),
             workdir / "resnet50.cli.onnx")]
    rows = []
    for run, out in runs:
        row = measured(run, args)
        if out.exists():
            row["bn_left_in_file"] = count_bn(onnx.load(str(out)))
        rows.append(row)
        log(f"[resnet50] {row}")
    return rows


# --------------------------------------------------------------------------------------------- table 5


def count_op(model: onnx.ModelProto, op_type: str) -> int:
    """Nodes of ``op_type`` in the main graph (no subgraphs or functions)."""
    return sum(node.op_type == op_type for node in model.graph.node)


def bn_to_identity(model: onnx.ModelProto) -> onnx.ModelProto:
    """The lower bound: a copy with every ``BatchNormalization`` node (graph, subgraphs, functions) replaced by an
    ``Identity`` of its input. Not the model's function; it keeps every branch and conv of the graph."""
    bound = onnx.ModelProto()
    bound.CopyFrom(model)

    def swap(nodes: Any) -> None:
        for node in nodes:
            for attr in node.attribute:
                for g in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else attr.graphs):
                    swap(g.node)
            if node.op_type == "BatchNormalization":
                x, y = node.input[0], node.output[0]
                del node.input[:], node.output[:], node.attribute[:]
                node.op_type, node.domain = "Identity", ""
                node.input.append(x)
                node.output.append(y)

    swap(bound.graph.node)
    for function in bound.functions:
        swap(function.node)
    return bound


def latency_session(graph: onnx.ModelProto, threads: int) -> ort.InferenceSession:
    """onnxruntime as a deployment runs it: default optimisation level (``ORT_ENABLE_ALL``), sequential; but with the
    intra-op threads' spin-waiting off: the variants are timed interleaved, and each session's threads otherwise keep
    spinning after its run, taking the cores from the next session's run (an A/A gap of up to 34% on 2 cores, and runs up to 4.5x slower)."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(graph.SerializeToString(), so, providers=["CPUExecutionProvider"])


def export_for_latency(model: torch.nn.Module, x: torch.Tensor, workdir: Path, name: str, exporter: str) -> Path:
    """The exporter's file (table 1's, when it already exists); ``unfolded``: TorchScript without constant folding."""
    path = workdir / f"{name}.{exporter}.onnx"
    if not path.exists():
        if exporter == "unfolded":
            torchscript_unfolded(model, x, path)
        else:
            torch_export(model, x, path, exporter)
    return path


def bench_latency(name: str, workdir: Path, args: argparse.Namespace) -> dict[str, Any]:
    spec = get_spec(name)
    model = build(name)
    x = input_for(spec)
    entry: dict[str, Any] = {"name": name, "input": "x".join(str(d) for d in spec.input_shape[1:]),
                             "bn_modules": bn_modules(model), "rows": {}}
    for exporter in args.latency_exporters:
        problems: dict[str, str] = {}
        row: dict[str, Any] = {"batches": []}
        entry["rows"][exporter] = row
        path = attempt("export", problems, export_for_latency, model, x, workdir, name, exporter)
        if path is None:
            row["error"] = f"export: {problems['export']}"
            log(f"[{name}] latency {exporter}: {row['error']}")
            continue
        exported = onnx.load(str(path))
        folded = attempt("bnfold", problems, lambda p=path: fold_graph(load_onnx(p)))
        if folded is None:
            row["error"] = f"bnfold: {problems['bnfold']}"
            log(f"[{name}] latency {exporter}: {row['error']}")
            continue
        graphs = {"exported": exported, "bnfold": folded.model, "bound": bn_to_identity(exported)}
        row["bn"] = {k: count_bn(g) for k, g in graphs.items()}
        row["conv"] = {k: count_op(g, "Conv") for k, g in graphs.items()}
        row["bnfold_folded"] = len(folded.folded)
        row["bnfold_skipped"] = [{"bn": s.bn, "reason": s.reason} for s in folded.skipped]
        sessions = attempt("session", problems,
                           lambda gs=graphs: {k: latency_session(g, args.threads) for k, g in gs.items()})
        if sessions is None:
            row["error"] = f"onnxruntime: {problems['session']}"
            log(f"[{name}] latency {exporter}: {row['error']}")
            continue
        if args.control:
            sessions["bound A/A"] = latency_session(graphs["bound"], args.threads)
        input_name = sessions["exported"].get_inputs()[0].name
        for batch in LATENCY_BATCHES:
            xb = input_for(spec, batch)
            reference = torch_outputs(model, xb)
            got = attempt(f"b{batch} run", problems, lambda xb=xb, g=graphs["bnfold"]: run_plain(g, xb.numpy()))
            parity = None
            if got is not None:
                rel = rel_error(reference, got)
                scale = max(float(np.abs(r).max(initial=0.0)) for r in reference) or 1.0
                parity = {"max_abs": rel * scale, "rel": rel}
            feed = {input_name: xb.numpy()}
            fns = {k: (lambda s=sess, f=feed: s.run(None, f)) for k, sess in sessions.items()}
            waiting = args.latency_quiet_wait_s if time.perf_counter() < args.deadline else 0.0
            med, info = bench_cpu(fns, args.latency_repeats, args.sample_ms / 1000, 3, args.latency_max_case_s, 5,
                                  waiting)
            if info["used_contended"] and time.perf_counter() < args.deadline:
                log(f"[{name}] latency {exporter} b{batch}: only {info['clean_rounds']}/{info['rounds']} rounds free "
                    "of other processes' CPU use; measuring again")
                med, info = bench_cpu(fns, args.latency_repeats, args.sample_ms / 1000, 3, args.latency_max_case_s,
                                      5, 2 * waiting)
            b = {"batch": batch, "ms": {k: v * 1000 for k, v in med.items()}, "parity": parity,
                 "rounds": info["rounds"], "clean_rounds": info["clean_rounds"],
                 "used_contended": info["used_contended"], "calls_per_sample": info["number"],
                 "min_max_ms": {k: [v[0] * 1000, v[1] * 1000] for k, v in info["min_max_s"].items()}}
            b["bnfold_over_bound"] = med["bnfold"] / med["bound"]
            b["bnfold_over_exported"] = med["bnfold"] / med["exported"]
            b["aa_pct"] = (med["bound A/A"] / med["bound"] - 1) * 100 if "bound A/A" in med else None
            row["batches"].append(b)
            log(f"[{name}] latency {exporter} b{batch}: " + ", ".join(f"{k} {v:.3f}" for k, v in b["ms"].items())
                + f" ms; bnfold/bound {b['bnfold_over_bound']:.2f}; BN {row['bn']}, Conv {row['conv']}; "
                f"{info['clean_rounds']}/{info['rounds']} clean rounds")
        row["problems"] = problems
    return entry


# --------------------------------------------------------------------------------------------- output


def fmt_err(v: float | None, dtype: str = "float32") -> str:
    if v is None:
        return "-"
    if v == float("inf"):
        return "inf !"
    return f"{v:.1e}" + (" !" if v > RTOL[dtype] else "")


def table1_rows(entries: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    cols = ["model", "exporter", "BN modules", "export s", "BN left: " + " / ".join(VARIANTS),
            "rel err: " + " / ".join(VARIANTS), "bnfold fold ms"]
    rows = []
    for e in entries:
        for i, (exporter, r) in enumerate(e["rows"].items()):
            head = [e["name"] if i == 0 else "", exporter, str(e["bn_modules"]) if i == 0 else ""]
            if "export_error" in r:
                rows.append([*head, "failed", "-", "-", "-"])
                continue

            def missing(v: str, r: dict[str, Any] = r) -> str:
                return "error" if v in r["errors"] else "n/a"  # n/a: the tool is not installed

            bn = " / ".join(str(r["bn_left"][v]) if v in r["bn_left"] else missing(v) for v in VARIANTS)
            err = " / ".join(fmt_err(r["rel_err"].get(v)) if v in r["bn_left"] else missing(v) for v in VARIANTS)
            fold_ms = r["time_s"].get("bnfold")
            rows.append([*head, f"{r['export_s']:.2f}", bn, err, "-" if fold_ms is None else f"{fold_ms * 1e3:.1f}"])
    return cols, rows


def table2_rows(entries: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    cols = ["model", *FP16_VARIANTS]
    rows = []
    for e in entries:
        cells = []
        for v in FP16_VARIANTS:
            if v in e["rel_err"]:
                worst, mean = e["rel_err"][v]
                cells.append(f"{fmt_err(worst, 'float16')} / {mean:.1e} ({e['bn_left'][v]} BN)")
            else:
                cells.append("error" if v in e["problems"] else "-")
        rows.append([e["name"], *cells])
    return cols, rows


def fmt_load(share: float | None) -> str:
    return "?" if share is None else f"{share * 100:.0f}%"


def load_cell(row: dict[str, Any]) -> str:
    """Other processes' CPU share during the kept run, and which try it was."""
    tries = row.get("attempts", 1)
    return fmt_load(row.get("other_load")) + (f" (try {tries})" if tries > 1 else "")


def table3_rows(r50: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    cols = ["tool", "best s (load / fold / save)", "cold s (load / fold / save)",
            "peak RSS rise, cold (after load / fold / save)", "x file size", "warm peak x file", "BN left", "rel err",
            "other load"]
    rows = []
    size = r50["file_bytes"]

    def split(run: dict[str, float], key: str, scale: float, fmt: str) -> str:
        parts = [format(run[f"{k}_{key}"] / scale, fmt) for k in ("load", "fold", "save") if f"{k}_{key}" in run]
        return f" ({' / '.join(parts)})" if len(parts) > 1 else ""

    for t in r50["tools"]:
        label = FILE_TOOLS[t["tool"]][0]
        if "error" in t:
            rows.append([label, "error", *["-"] * (len(cols) - 2)])
            continue
        best = min(t["runs"], key=lambda r: r["wall_s"])
        cold = t["runs"][0]
        warm_peak = max(r["peak_rise_kb"] for r in t["runs"][1:]) * 1024 if len(t["runs"]) > 1 else None
        rows.append([label, f"{best['wall_s']:.3f}" + split(best, "s", 1, ".3f"),
                     f"{cold['wall_s']:.3f}" + split(cold, "s", 1, ".3f"),
                     f"{cold['peak_rise_kb'] / 1024:.0f} MB" + split(cold, "peak_kb", 1024, ".0f"),
                     f"{cold['peak_rise_kb'] * 1024 / size:.2f}x",
                     "-" if warm_peak is None else f"{warm_peak / size:.2f}x",
                     str(t["bn_left"]), fmt_err(t["rel_err"]), load_cell(t)])
    return cols, rows


EXPORT_STAGES = ("reference", "audit", "fold", "export", "graph fold", "check", "onnxruntime", "write")


def table4_rows(runs: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    stages = [*EXPORT_STAGES, *sorted({k for r in runs for k in r.get("timings", {}) if k not in EXPORT_STAGES})]
    cols = ["how", "wall s", "ok", *[f"{k} s" for k in stages], "outside the stages s", "BN left", "other load"]
    rows = []
    for r in runs:
        timings = r.get("timings", {})
        outside = f"{r['wall_s'] - sum(timings.values()):.2f}" if timings else "-"
        rows.append([r["how"], f"{r['wall_s']:.1f}", "yes" if r.get("ok") else "no",
                     *[f"{timings[k]:.2f}" if k in timings else "-" for k in stages], outside,
                     str(r.get("bn_left_in_file", "-")), load_cell(r)])
    return cols, rows


def table5_rows(entries: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    cols = ["model", "input", "exporter", "BN: exported / bnfold", "Conv: exported / bnfold", "batch", "exported ms",
            "bnfold ms", "bound ms", "bnfold / bound", "bound A/A %", "bnfold / exported", "bnfold max abs / rel err"]
    rows = []
    for e in entries:
        first_model = True
        for exporter, r in e["rows"].items():
            head = [e["name"] if first_model else "", e["input"] if first_model else "", exporter]
            first_model = False
            if "error" in r:
                rows.append([*head, "error: " + r["error"], *[""] * (len(cols) - 4)])
                continue
            for i, b in enumerate(r["batches"]):
                first = i == 0
                ms = b["ms"]
                parity = "-" if b["parity"] is None else f"{b['parity']['max_abs']:.1e} / {fmt_err(b['parity']['rel'])}"
                rows.append([
                    *(head if first else ["", "", ""]),
                    f"{r['bn']['exported']} / {r['bn']['bnfold']}" if first else "",
                    f"{r['conv']['exported']} / {r['conv']['bnfold']}" if first else "",
                    str(b["batch"]),
                    *(f"{ms[k]:.3f}" if ms[k] < 10 else f"{ms[k]:.1f}" for k in ("exported", "bnfold", "bound")),
                    f"{b['bnfold_over_bound']:.2f}" + ("*" if b["used_contended"] else ""),
                    "n/a" if b["aa_pct"] is None else f"{b['aa_pct']:+.1f}",
                    f"{b['bnfold_over_exported']:.2f}",
                    parity,
                ])
    return cols, rows


def plain_table(cols: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(c), *(len(r[i]) for r in rows)) if rows else len(c) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths)).rstrip(),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    return "\n".join(lines)


def markdown_table(cols: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join(["---"] * len(cols)) + "|"]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows]
    return "\n".join(lines)


def notes(entries: list[dict[str, Any]], fp16: list[dict[str, Any]], r50: dict[str, Any] | None,
          exports: list[dict[str, Any]], latency: list[dict[str, Any]] | None = None) -> list[str]:
    """What misses a target or looks wrong, one line each."""
    out = []
    for e in latency or []:
        for exporter, r in e["rows"].items():
            where = f"{e['name']} ({exporter}, onnxruntime latency)"
            if "error" in r:
                out.append(f"{where}: {r['error']}")
                continue
            for key, msg in r.get("problems", {}).items():
                out.append(f"{where}: {key}: {msg}")
            merged = r["conv"]["bnfold"] < r["conv"]["exported"]
            for b in r["batches"]:
                if merged:
                    verdict = "faster than" if b["bnfold_over_bound"] < 1 else "NOT faster than"
                    out.append(f"{where} b{b['batch']}: bnfold merged branches (Conv {r['conv']['exported']} -> "
                               f"{r['conv']['bnfold']}) and is {verdict} the BN->Identity bound: bnfold / bound = "
                               f"{b['bnfold_over_bound']:.2f}")
                if b["parity"] is not None and b["parity"]["rel"] > RTOL["float32"]:
                    out.append(f"{where} b{b['batch']}: bnfold's graph differs from the PyTorch eval model: rel err "
                               f"{b['parity']['rel']:.2e}")
                if b["used_contended"]:
                    out.append(f"{where} b{b['batch']}: (*) too few rounds free of other processes' CPU use "
                               f"({b['clean_rounds']}/{b['rounds']})")
    for e in entries:
        for exporter, r in e["rows"].items():
            where = f"{e['name']} ({exporter})"
            if "export_error" in r:
                out.append(f"{where}: export failed: {r['export_error']}")
                continue
            for key, msg in r["errors"].items():
                out.append(f"{where}: {key}: {msg}")
            for s in r.get("bnfold_skipped", []):
                out.append(f"{where}: bnfold left {s['bn']}: {s['reason']}")
            for v, err in r["rel_err"].items():
                if err > RTOL["float32"]:
                    out.append(f"{where}: {v} differs from the PyTorch eval model: rel err {err:.2e}")
            left = r["bn_left"]
            for v in VARIANTS[:-1]:
                if v in left and "bnfold" in left and left[v] < left["bnfold"]:
                    out.append(f"{where}: {v} leaves {left[v]} BN, fewer than bnfold's {left['bnfold']}")
    for e in fp16:
        for v, msg in e["problems"].items():
            out.append(f"{e['name']} fp16 {v}: {msg}")
    if r50:
        for t in r50["tools"]:
            if "error" in t:
                out.append(f"resnet50 {t['tool']}: {t['error']}")
            elif t["tool"] == "bnfold":
                best = min(r["wall_s"] for r in t["runs"])
                cold = t["runs"][0]
                peak_x = cold["peak_rise_kb"] * 1024 / r50["file_bytes"]
                out.append(f"resnet50 load_onnx + fold_graph + save_onnx: best {best:.3f}s, cold {cold['wall_s']:.3f}s "
                           f"(target < {TARGET_FOLD_S:g}s: {'met' if best < TARGET_FOLD_S else 'MISSED'} warm, "
                           f"{'met' if cold['wall_s'] < TARGET_FOLD_S else 'MISSED'} cold); peak RSS rise "
                           f"{peak_x:.2f}x the file (target < {TARGET_MEM_X:g}x: "
                           f"{'met' if peak_x < TARGET_MEM_X else 'MISSED'})")
    for r in exports:
        if not r.get("ok"):
            out.append(f"resnet50 {r['how']}: failed: {r.get('error') or r.get('rc')}")
        out.append(f"resnet50 {r['how']}: {r['wall_s']:.1f}s (target < {TARGET_EXPORT_S:g}s: "
                   f"{'met' if r['wall_s'] < TARGET_EXPORT_S else 'MISSED'}; other processes used "
                   f"{fmt_load(r.get('other_load'))} of the CPU meanwhile)")
    return out


# --------------------------------------------------------------------------------------------- main


def machine_info() -> dict[str, Any]:
    return {"python": platform.python_version(), "platform": platform.platform(), "cpu_count": os.cpu_count(),
            "threads": torch.get_num_threads(), "torch": torch.__version__, "onnx": onnx.__version__,
            "onnxruntime": ort.__version__, "onnxscript": onnxscript.__version__,
            "onnxslim": getattr(onnxslim, "__version__", "?") if onnxslim is not None else None,
            **source_state()}  # git commit, local changes under bnfold/, a hash of its sources


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="", help="comma-separated reference models (default: all of REFERENCE_MODELS)")
    p.add_argument("--dynamo-models", default="",
                   help="models also exported with the dynamo exporter (default: the same as --models)")
    p.add_argument("--fp16-models", default=",".join(FP16_MODELS), help=f"default: {','.join(FP16_MODELS)}")
    p.add_argument("--fp16-exporter", default="dynamo", choices=EXPORTERS,
                   help="exporter of the `bnfold export --fp16` column (default: dynamo, bnfold export's default)")
    p.add_argument("--repeats", type=int, default=3, help="ResNet-50 fold runs per tool; the fastest is reported")
    p.add_argument("--no-resnet50", dest="resnet50", action="store_false", help="skip tables 3 and 4")
    p.add_argument("--quiet-wait-s", type=float, default=60.0,
                   help="before each ResNet-50 measurement, wait up to this long for other processes to leave the CPU")
    p.add_argument("--retries", type=int, default=2,
                   help=f"measure a ResNet-50 figure again (keeping the least disturbed) while other processes took "
                        f"over {MAX_OTHER_LOAD * 100:.0f}%% of the CPU (default 2)")
    p.add_argument("--budget-s", type=float, default=420.0,
                   help="after this many seconds, stop waiting for a quiet machine and measuring again (default 420)")
    p.add_argument("--latency-models", default=",".join(LATENCY_MODELS),
                   help="table 5 (onnxruntime latency) models: zoo names or bench_fuse.py's bench-sized ones "
                        f"(default: {','.join(LATENCY_MODELS)}); --no-latency skips it")
    p.add_argument("--no-latency", dest="latency", action="store_false", help="skip table 5")
    p.add_argument("--latency-exporters", default=",".join(LATENCY_EXPORTERS),
                   help=f"table 5 exporters (default: {','.join(LATENCY_EXPORTERS)})")
    p.add_argument("--latency-repeats", type=int, default=20, help="table 5 rounds per model, exporter and batch")
    p.add_argument("--latency-max-case-s", type=float, default=8.0,
                   help="cap on seconds per table 5 case (model, exporter, batch); slow ones get fewer rounds")
    p.add_argument("--latency-quiet-wait-s", type=float, default=10.0,
                   help="before each table 5 case, wait up to this long for other processes to leave the CPU")
    p.add_argument("--sample-ms", type=float, default=10.0,
                   help="table 5: each sample times enough consecutive runs to last about this long (default 10)")
    p.add_argument("--no-control", dest="control", action="store_false",
                   help="table 5: skip the A/A control (a second session of the bound)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(),
                   help="torch.set_num_threads, and onnxruntime's intra-op threads in table 5")
    p.add_argument("--json", dest="json_path", default=None, help="write every figure here")
    p.add_argument("--markdown", default=None, help="write the tables as markdown here")
    p.add_argument("--_fold-child", dest="fold_child", nargs=3, metavar=("TOOL", "SRC", "DST"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def names_from(text: str, default: list[str]) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()] or default
    for n in names:
        get_spec(n)  # fail early on unknown names
    return names


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.fold_child:
        tool, src, dst = args.fold_child
        print("@@FOLD@@" + json.dumps(fold_file_child(tool, Path(src), Path(dst), args.repeats)), flush=True)
        return 0
    warnings.simplefilter("ignore")
    models = names_from(args.models, list(zoo.REFERENCE_MODELS))
    dynamo_models = set(names_from(args.dynamo_models, models))
    fp16_models = names_from(args.fp16_models, [])
    latency_models = names_from(args.latency_models, []) if args.latency else []
    args.latency_exporters = tuple(e.strip() for e in args.latency_exporters.split(",") if e.strip())
    for e in args.latency_exporters:
        if e not in LATENCY_EXPORTERS:
            raise SystemExit(f"--latency-exporters: unknown {e!r}; known: {', '.join(LATENCY_EXPORTERS)}")
    machine = machine_info()
    log(f"{machine}")
    start = time.perf_counter()
    args.deadline = start + args.budget_s
    with tempfile.TemporaryDirectory(prefix="bench-onnx-") as tmp:
        workdir = Path(tmp)
        entries = [bench_model(n, tuple(e for e in EXPORTERS if e != "dynamo" or n in dynamo_models), workdir)
                   for n in models]
        t_table1 = time.perf_counter() - start
        fp16 = [bench_fp16(n, workdir, args.fp16_exporter) for n in fp16_models]
        t_latency0 = time.perf_counter()
        latency = [bench_latency(n, workdir, args) for n in latency_models]
        t_latency = time.perf_counter() - t_latency0
        r50 = bench_resnet50_fold(workdir, args) if args.resnet50 else None
        exports = bench_export(workdir, args) if args.resnet50 else []
    elapsed = time.perf_counter() - start

    tables = [(("BatchNorm left and parity (rel err = max |onnx - torch| / max |torch|, onnxruntime optimisations "
                "off; ! = above 1e-4)"), table1_rows(entries))]
    if fp16:
        title = "fp16 graphs vs the fp32 eval model (rel err max / mean; ! = above 1e-2), BatchNormalization left"
        tables.append((title, table2_rows(fp16)))
    if r50:
        title = (f"Folding a ResNet-50 ONNX file ({r50['file_bytes'] / 2**20:.1f} MB, {r50['bn_in_file']} BN), "
                 f"best of {args.repeats}, each tool in a fresh process")
        tables.append((title, table3_rows(r50)))
    if exports:
        tables.append(("bnfold export of the ResNet-50, default exporter, one run each", table4_rows(exports)))
    if latency:
        title = (f"onnxruntime latency (ORT_ENABLE_ALL, {args.threads} threads, median ms per run): exported vs "
                 "bnfold fold_graph vs the BN->Identity bound (keeps every branch); bnfold / bound < 1 = faster than "
                 "the bound; * = contended rounds used; parity at that batch, ! = above 1e-4")
        tables.append((title, table5_rows(latency)))
    for title, (cols, rows) in tables:
        print(f"\n{title}\n")
        print(plain_table(cols, rows))
    lines = notes(entries, fp16, r50, exports, latency)
    if lines:
        print("\nNotes:")
        for line in lines:
            print(f"  - {line}")
    print(f"\nTotal benchmark time: {elapsed:.0f}s (table 1: {t_table1:.0f}s, table 5: {t_latency:.0f}s)")

    if args.markdown:
        Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(args.markdown).write_text("\n\n".join(f"{title}:\n\n{markdown_table(*t)}" for title, t in tables) + "\n")
    if args.json_path:
        Path(args.json_path).parent.mkdir(parents=True, exist_ok=True)
        given = {k: v for k, v in vars(args).items() if k not in ("fold_child", "deadline")}
        payload = {"command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
                   "machine": machine, "args": given,
                   "elapsed_s": elapsed, "models": entries, "fp16": fp16, "resnet50_fold": r50, "export": exports,
                   "latency": latency, "notes": lines}
        Path(args.json_path).write_text(json.dumps(payload, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
