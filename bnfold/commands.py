"""What each command does with files: check the paths, load, run the library call, write the outputs.

One function per command takes that command's typed options (:mod:`bnfold.options`) and returns what the CLI
renders; a library caller gets the same behaviour without the CLI. Nothing is written unless the run passes
(``fuse``, ``export``), every output is checked against every input first (:func:`bnfold.save.check_paths`),
and the model's kind decides what applies (:mod:`bnfold.kinds`).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from bnfold.config import ModelConfig, find_pyproject, load_config
from bnfold.data import load_data
from bnfold.errors import InputSpecError, OutputError
from bnfold.export import ExportResult, export
from bnfold.fuse import fuse
from bnfold.inputs import make_inputs
from bnfold.inspect import InspectReport, inspect
from bnfold.kinds import adapter_for
from bnfold.load import Loaded, load
from bnfold.onnx.fuse import fuse_onnx
from bnfold.onnx.io import external_data_files, save_onnx
from bnfold.options import (
    ExportOptions,
    FuseOptions,
    InspectOptions,
    ModelSource,
    Progress,
    RecalibrateOptions,
    VerifyOptions,
    no_progress,
)
from bnfold.parallel import verify_many
from bnfold.plot import plot_inspect, require_matplotlib
from bnfold.recalibrate import RecalibrationResult, recalibrate
from bnfold.report import write_json
from bnfold.save import WEIGHTS_ONLY, check_paths, derived_path, fused_format, save_model
from bnfold.verify import CHECKS, Report, verify


@dataclass
class Written:
    """A command's result, the file it wrote (None: nothing), and what the JSON report says of its input/output."""

    result: Any
    written: str | None = None
    input: dict[str, Any] = field(default_factory=dict)
    output: dict[str, Any] = field(default_factory=dict)


def _load(source: ModelSource, progress: Progress) -> Loaded:
    with progress(f"loading {source.model_path}"):
        return load(source.model_path, arch=source.arch, arch_kwargs=source.arch_kwargs, trust=source.trust)


def _described(loaded: Loaded, specs: list) -> dict[str, Any]:
    return {"path": str(loaded.path), "format": loaded.format, "shapes": [str(s) for s in specs]}


# -- fuse ------------------------------------------------------------------------------------------------------
def fuse_file(options: FuseOptions, progress: Progress = no_progress) -> Written:
    """``bnfold fuse``: fold MODEL and write it in its own format (a state dict as a ``.pt2`` program)."""
    started = time.perf_counter()
    source, compare = options.model, options.compare
    compare.check()
    specs = source.specs()
    check_paths({"MODEL": source.model_path}, {"-o": options.output, "--json": options.json_path})
    loaded = _load(source, progress)
    adapter = adapter_for(loaded.model, method=options.discovery, keep_structure=options.keep_structure)
    if adapter.runs_in_onnxruntime:
        return _fuse_graph(options, loaded, specs, progress, started)
    if options.external_data or options.timeout is not None:
        raise InputSpecError("--external-data and --timeout apply to ONNX files only",
                             "bnfold export writes ONNX files")
    specs = adapter.specs(specs, f"{loaded.path} ({loaded.format}) does not say what input it takes")
    if options.keep_structure and loaded.format not in WEIGHTS_ONLY:
        raise InputSpecError("--keep-structure applies to state dicts and .safetensors files only",
                             f"{source.model_path} is a {loaded.format} file; its output keeps its format anyway")
    out_format = fused_format(loaded.format, options.keep_structure)
    out_path = options.output or derived_path(source.model_path, "fused", out_format)
    check_paths({"MODEL": source.model_path}, {"-o": out_path, "--json": options.json_path})
    with progress("folding and comparing"):
        result = fuse(adapter, specs, atol=compare.atol, rtol=compare.rtol, seed=compare.seed)
    result.notes[:0] = loaded.notes
    written = None
    if result.ok:
        with progress(f"writing {out_path}"):
            save_model(result.model, out_format, out_path, make_inputs(specs, compare.seed))
        written = str(out_path)
    result.timings["total"] = time.perf_counter() - started
    return Written(result, written, _described(loaded, specs),
                   {"path": written, "format": out_format if written else None})


def _fuse_graph(options: FuseOptions, loaded: Loaded, specs: list, progress: Progress, started: float) -> Written:
    """An ONNX file: folded and proven in onnxruntime, written as ONNX (external data as the input had it)."""
    model_path, compare = options.model.model_path, options.compare
    out_path = options.output or derived_path(model_path, "fused", "onnx")
    data_path = out_path.with_name(out_path.name + ".data")
    data_files = external_data_files(model_path)
    inputs = {"MODEL": model_path, **{f"MODEL's data file {p.name}": p for p in data_files}}
    check_paths(inputs, {"-o": out_path, "external data": data_path, "--json": options.json_path})
    with progress("folding and comparing in onnxruntime"):
        result = fuse_onnx(loaded.model, model_path, specs or None, atol=compare.atol, rtol=compare.rtol,
                           seed=compare.seed, timeout=options.timeout, consume=True)
    written = None
    if result.ok:
        with progress(f"writing {out_path}"):
            # external data when asked, or when the input had it (past 2 GB save_onnx decides by itself)
            files = save_onnx(result.model, out_path, external_data=options.external_data or bool(data_files))
        written = ", ".join(map(str, files))
    result.timings["total"] = time.perf_counter() - started
    return Written(result, written, {"path": str(model_path), "format": "onnx"},
                   {"path": str(out_path) if written else None, "format": "onnx" if written else None})


# -- export ----------------------------------------------------------------------------------------------------
def export_file(options: ExportOptions, progress: Progress = no_progress) -> Written:
    """``bnfold export``: a folded ONNX file at ``-o`` (MODEL's name with ``.onnx`` by default), proven first."""
    source, compare = options.model, options.compare
    compare.check()
    specs = source.specs()
    out_path = options.output or source.model_path.with_suffix(".onnx")
    data_path = out_path.with_name(out_path.name + ".data")
    check_paths({"MODEL": source.model_path}, {"-o": out_path, "external data": data_path,
                                               "--json": options.json_path})
    loaded = _load(source, progress)
    adapter = adapter_for(loaded.model)
    adapter.require("export", name=str(source.model_path), file=str(source.model_path))
    specs = adapter.specs(specs, f"{loaded.path} ({loaded.format}) does not say what input it takes")
    with progress("auditing, folding, exporting and comparing"):
        result: ExportResult = export(
            adapter, specs, out_path, exporter=options.exporter, opset=options.opset,
            static_batch=options.static_batch, fp16=options.fp16, keep_io_types=options.keep_io_types,
            external_data=options.external_data, fold=not options.no_fold, force=options.force, atol=compare.atol,
            rtol=compare.rtol, seed=compare.seed, timeout=options.timeout)
    result.notes[:0] = loaded.notes
    return Written(result, str(result.output) if result.output else None, _described(loaded, specs))


# -- verify ----------------------------------------------------------------------------------------------------
def verify_files(options: VerifyOptions, progress: Progress = no_progress) -> list[Report]:
    """``bnfold verify``: MODEL, or every model of the config, each a :class:`~bnfold.verify.Report` in order.

    Command-line values win over the config's; ``--disable`` adds to each model's own list."""
    options.compare.check()
    disabled = options.disabled()
    configs, pyproject = _configs(options, disabled)
    check_paths(_verify_inputs(configs, pyproject), {"--json": options.json_path, "--junit": options.junit_path})
    calls = [_verify_call(cfg, options, disabled) for cfg in configs]
    if options.jobs > 1 and len(calls) > 1:
        with progress(f"verifying {len(calls)} models in {min(options.jobs, len(calls))} processes") as spinner:
            done: list[int] = []

            def tick(i: int) -> None:
                done.append(i)
                if spinner is not None:
                    spinner.update(f"verified {len(done)}/{len(calls)} models (last: {configs[i].name})")

            return verify_many(calls, options.jobs, on_done=tick)
    reports = []
    for i, (cfg, call) in enumerate(zip(configs, calls), 1):
        with progress(f"[{i}/{len(configs)}] verifying {cfg.name}"):
            reports.append(verify(**call))
    return reports


def _configs(options: VerifyOptions, disabled: tuple[str, ...]) -> tuple[list[ModelConfig], Path | None]:
    source, compare = options.model, options.compare
    if source is not None:
        return [ModelConfig(path=source.model_path, name=str(source.model_path), arch=source.arch,
                            arch_kwargs=source.arch_kwargs, input_specs=source.specs(), onnx=options.onnx_path,
                            exporter=options.exporter, disable=disabled, atol=compare.atol, rtol=compare.rtol,
                            trust=source.trust, seed=compare.seed, data=options.data_spec,
                            timeout=options.timeout)], None
    pyproject = options.config_path or find_pyproject(Path.cwd())
    return load_config(pyproject, trust=options.trust), pyproject


def _verify_inputs(configs: list[ModelConfig], pyproject: Path | None) -> dict[str, Path | None]:
    """Every file a verification reads, by how the user named it: no report may be written over one."""
    inputs: dict[str, Path | None] = {"--config": pyproject}
    for cfg in configs:
        inputs.update({f"model {cfg.name}": cfg.path, f"--onnx of {cfg.name}": cfg.onnx})
        for graph in (cfg.path, cfg.onnx):
            if graph is not None:
                inputs.update({f"data file {p.name} of {cfg.name}": p for p in external_data_files(graph)})
        if cfg.data and Path(cfg.data).exists():
            inputs[f"--data of {cfg.name}"] = Path(cfg.data)
    return inputs


def _verify_call(cfg: ModelConfig, options: VerifyOptions, disabled: tuple[str, ...]) -> dict[str, Any]:
    """The keyword arguments of :func:`bnfold.verify.verify` for one configured model."""
    compare = options.compare
    trust = options.model.trust if options.model is not None else options.trust
    return {"model": cfg.path, "example_inputs": cfg.input_specs or None, "onnx": cfg.onnx, "exporter": cfg.exporter,
            "checks": tuple(c for c in cfg.checks if c in CHECKS and c not in options.skip_checks),
            "disable": tuple(dict.fromkeys(cfg.disable + disabled)), "atol": _first(compare.atol, cfg.atol),
            "rtol": _first(compare.rtol, cfg.rtol), "seed": cfg.seed, "arch": cfg.arch, "arch_kwargs": cfg.arch_kwargs,
            "trust": trust, "name": cfg.name, "data": options.data_spec or cfg.data,
            "timeout": _first(options.timeout, cfg.timeout), "code_root": cfg.root}


def _first(*values: Any) -> Any:
    """The command line's value when given, else the config's."""
    return next((v for v in values if v is not None), None)


# -- inspect ---------------------------------------------------------------------------------------------------
def inspect_file(options: InspectOptions, progress: Progress = no_progress) -> Written:
    """``bnfold inspect``: the report, and the PNG at ``--plot`` when asked (drawn after the work)."""
    source = options.model
    specs = source.specs()
    data_path = Path(options.data_spec) if options.data_spec and Path(options.data_spec).exists() else None
    plot_path = options.plot_path
    check_paths({"MODEL": source.model_path, "--data": data_path}, {"--json": options.json_path, "--plot": plot_path})
    if plot_path is not None:
        if plot_path.suffix.lower() != ".png":
            raise OutputError(f"--plot {plot_path}: bnfold draws PNG files", f"name it {plot_path.stem}.png")
        require_matplotlib()  # before the work, not after it
    loaded = _load(source, progress)
    adapter = adapter_for(loaded.model)
    specs = adapter.specs(specs, f"{loaded.path} ({loaded.format}) does not say what input it takes")
    with progress("inspecting" + (" and measuring drift" if options.data_spec else "")):
        report: InspectReport = inspect(adapter, specs or None, data=options.data_spec)
    report.notes[:0] = loaded.notes
    if plot_path is not None:
        with progress(f"drawing {plot_path}"):
            plot_inspect(report, plot_path, title=f"BatchNorm inspection: {source.model_path.name} ({loaded.format})")
    return Written(report, str(plot_path) if plot_path else None, _described(loaded, specs))


# -- recalibrate -----------------------------------------------------------------------------------------------
def recalibrate_file(options: RecalibrateOptions, progress: Progress = no_progress) -> Written | None:
    """``bnfold recalibrate``: the model with re-estimated statistics, written in its own format. Under torchrun
    every process computes and only rank 0 writes (the others get None)."""
    source = options.model
    out_path = options.output or source.model_path.with_name(
        f"{source.model_path.stem}.recal{source.model_path.suffix}")
    data_path = Path(options.data_spec) if Path(options.data_spec).exists() else None
    check_paths({"MODEL": source.model_path, "--data": data_path}, {"-o": out_path, "--json": options.json_path})
    distributed = _init_distributed()
    loaded = load(source.model_path, arch=source.arch, arch_kwargs=source.arch_kwargs, trust=source.trust)
    if not adapter_for(loaded.model).eager:
        raise InputSpecError(f"{source.model_path} is a {loaded.format} file: recalibration needs an eager model",
                             "pass a state dict with --arch, or a pickled module")
    dtype = next((p.dtype for p in loaded.model.parameters()), torch.float32)
    try:
        with progress("recalibrating"):
            result: RecalibrationResult = recalibrate(loaded.model, load_data(options.data_spec, options.batch_size,
                                                                              dtype),
                                                      samples=options.samples, method=options.method)
    finally:
        if distributed:
            rank_zero = _is_rank_zero()
            dist.destroy_process_group()
    if distributed and not rank_zero:
        return None
    save_model(result.model, loaded.format, out_path)
    if options.json_path is not None:
        write_json(options.json_path, {"schema_version": 1, "command": "recalibrate", "output": str(out_path),
                                       **result.to_dict()})
    return Written(result, str(out_path))


def _init_distributed() -> bool:
    """Join the process group when started by torchrun (WORLD_SIZE > 1): gloo on CPU."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        return True
    return dist.is_initialized()


def _is_rank_zero() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0
