"""The ``bnfold`` command line: parse, call the library, render, exit through :func:`exit_code`."""

from __future__ import annotations

import os
import signal
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import click
import torch
from onnx.defs import onnx_opset_version
from rich.console import Console
from rich.markup import escape

from bnfold import __version__
from bnfold.compare import check_tolerance
from bnfold.errors import BnfoldError, InputSpecError, OutputError, first_line
from bnfold.findings import code_range
from bnfold.fuse import FuseResult, fuse
from bnfold.inputs import SHAPE_HINT, make_inputs, parse_input_spec
from bnfold.load import load
from bnfold.report import fuse_document, render_fuse, write_json
from bnfold.save import save_model
from bnfold.signals import Terminated, handle_signals

#: Exit codes (API, documented in the README). 130/143: interrupted by Ctrl-C / SIGTERM (128 + the signal).
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
EXIT_INTERRUPTED, EXIT_TERMINATED = 128 + signal.SIGINT, 128 + signal.SIGTERM

_OUTPUT_SUFFIX = {"torchscript": ".pt", "export": ".pt2", "pickle": ".pt", "state_dict": ".pt",
                  "safetensors": ".safetensors", "onnx": ".onnx"}


def exit_code(result: FuseResult) -> int:
    """0 when the folded model matches the unfolded eval model within tolerance, else 1."""
    return EXIT_OK if result.ok else EXIT_FAILED


def _stdout_console() -> Console:
    """Wide enough for tables in CI logs, where stdout is not a terminal and rich would assume 80 columns.
    No emoji codes: a file named ``a:x:b.pt`` is printed as it is."""
    return Console(highlight=False, emoji=False, width=None if sys.stdout.isatty() else 160)


def _status_console() -> Console:
    return Console(stderr=True, highlight=False, emoji=False)


def _exit_through(run: Callable[[], int], debug: bool) -> NoReturn:
    """Run a command and exit with its code; bad input becomes one ``error:`` line and exit 2 (unless --debug).

    Ctrl-C exits 130 and SIGTERM 143, after temp files and child processes are cleaned up by the unwinding.
    """
    warnings.filterwarnings("ignore", category=FutureWarning)  # torch's own deprecation chatter, not the user's
    try:
        with handle_signals():
            code = run()
    except KeyboardInterrupt:
        _fail("interrupted (Ctrl-C): nothing was written", code=EXIT_INTERRUPTED)
    except Terminated:
        _fail("terminated (SIGTERM): nothing was written", code=EXIT_TERMINATED)
    except BnfoldError as exc:
        if debug:
            raise
        _fail(exc.message, exc.hint)
    except Exception as exc:  # a bug or an unexpected library error: still one line, unless --debug
        if debug:
            raise
        _fail(f"{type(exc).__name__}: {first_line(exc)}", "rerun with --debug for the traceback, and please "
              "report it")
    sys.exit(code)


def _fail(message: str, hint: str | None = None, code: int = EXIT_USAGE) -> NoReturn:
    console = Console(stderr=True, highlight=False, emoji=False)
    console.print(f"[red]error:[/red] {escape(message)}", markup=True, soft_wrap=True)
    if hint:
        console.print(f"Note: {hint}", markup=False, soft_wrap=True)
    sys.exit(code)


# -- paths: no output may be an input or another output ----------------------------------------------------
def _identity(path: Path) -> tuple[Any, ...]:
    """What makes two paths the same file: the inode when it exists (hard links, symlinks), else the real path."""
    try:
        st = path.stat()
        return ("inode", st.st_dev, st.st_ino)
    except OSError:
        return ("path", os.path.realpath(path))


def check_paths(inputs: dict[str, Path | None], outputs: dict[str, Path | None]) -> None:
    """Refuse an output that is an input, an existing folder, or the same file as another output.

    Keys are how the user named each path (``MODEL``, ``--json``...), for the message.
    """
    seen: dict[tuple[Any, ...], str] = {}
    for label, path in inputs.items():
        if path is not None:
            seen.setdefault(_identity(Path(path)), label)
            seen.setdefault(("path", os.path.realpath(path)), label)
    for label, path in outputs.items():
        if path is None:
            continue
        path = Path(path)
        if path.is_dir():
            raise OutputError(f"{label} {path} is a folder", f"pass a file name for {label}")
        for key in (_identity(path), ("path", os.path.realpath(path))):
            if key in seen:
                other = seen[key]
                what = "the input" if other in inputs else "also the output of"
                raise OutputError(f"{label} {path} is {what} {other}: bnfold never overwrites its inputs, and writes "
                                  "each output to its own file", f"pass another path for {label}")
        seen[_identity(path)] = seen[("path", os.path.realpath(path))] = label


def _tolerances(atol: float | None, rtol: float | None) -> None:
    check_tolerance("--atol", atol)
    check_tolerance("--rtol", rtol)


# -- options shared by the commands (declared once) ---------------------------------------------------------
def _options(*decorators: Callable[[Callable[..., Any]], Callable[..., Any]]):
    def apply(function: Callable[..., Any]) -> Callable[..., Any]:
        for decorator in reversed(decorators):
            function = decorator(function)
        return function
    return apply


INPUT_SHAPE = click.option(
    "--input-shape", "input_shapes", multiple=True, metavar="N,C,H,W[:DTYPE[:LOW..HIGH]]",
    help="Example input shape, repeat for several inputs; dtype float32 (default), float16, bfloat16, int64, ...; "
         "LOW..HIGH draws values from that range (token ids: 8,128:int64:0..30522). Not needed for .pt2 programs.")
ARCH = click.option("--arch", metavar="MODULE:FACTORY", help="Callable that builds the model, for state dicts and "
                    ".safetensors files (imported from the current directory too).")
ARCH_KWARGS = click.option("--arch-kwargs", metavar="JSON", help="Keyword arguments for --arch, as a JSON object.")
TRUST = click.option("--trust", "--trust-pickle", "trust", is_flag=True,
                     help="Trust the model file (and a config that names code): allow whole pickles, pickled "
                          ".pt2 members and TorchScript with non-core operators. They run code from the file.")
ATOL = click.option("--atol", type=float, help="Absolute tolerance [default: per dtype, 1e-5 for float32].")
RTOL = click.option("--rtol", type=float, help="Tolerance relative to each output's max magnitude "
                    "[default: per dtype, 1e-4 for float32].")
SEED = click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random inputs.")
JSON = click.option("--json", "json_path", type=click.Path(path_type=Path, dir_okay=False),
                    help="Also write the report as JSON to this path.")
DEBUG = click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors.")
MODEL_OPTIONS = _options(INPUT_SHAPE, ARCH, ARCH_KWARGS, TRUST)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="bnfold")
def main() -> None:
    """bnfold: make BatchNorm safe to ship.

    \b
    verify       catch train/inference-mode bugs and prove fold and ONNX parity (a CI gate)
    fuse         fold BatchNorm into conv/linear weights (PyTorch or ONNX) and prove parity
    export       write a folded ONNX file, proven in onnxruntime against the PyTorch eval model
    inspect      every BatchNorm at a glance: plan, statistics, risks, drift
    recalibrate  re-estimate running statistics on data ("precise BN")

    \b
    Exit codes: 0 success, 1 parity outside tolerance (nothing written), 2 bad input (one-line error),
    130 interrupted (Ctrl-C), 143 terminated (SIGTERM).
    """


def _load(model_path: Path, arch: str | None, arch_kwargs: str | None, trust: bool, status: Console) -> Any:
    with status.status(f"loading {escape(str(model_path))}"):
        return load(model_path, arch=arch, arch_kwargs=arch_kwargs, trust=trust)


def _input_specs(given: list, loaded: Any) -> list:
    """``--input-shape`` when given, else what the file declares (a .pt2 program); one of them is needed."""
    specs = given or loaded.input_specs or []
    if not specs:
        raise InputSpecError(f"{loaded.path} ({loaded.format}) does not say what input it takes", SHAPE_HINT)
    return specs


def _output_path(model_path: Path, fmt: str, output: Path | None) -> Path:
    return output if output is not None else model_path.with_name(f"{model_path.stem}.fused{_OUTPUT_SUFFIX[fmt]}")


@main.command("fuse")
@click.argument("model_path", metavar="MODEL", type=click.Path(path_type=Path, dir_okay=False))
@click.option("-o", "--output", type=click.Path(path_type=Path, dir_okay=False),
              help="Where to write the folded model [default: MODEL's name with .fused before the suffix].")
@MODEL_OPTIONS
@click.option("--keep-structure", is_flag=True, help="For state dicts: write a state dict for the same "
              "architecture, BNs neutralised (identity statistics), instead of a .pt2 program.")
@ATOL
@RTOL
@SEED
@click.option("--discovery", type=click.Choice(["auto", "fx", "observed"]), default="auto", show_default=True,
              help="How BN pairs are found in eager models: torch.fx, observing forward passes, or fx falling "
                   "back to observation.")
@JSON
@click.option("--external-data", is_flag=True, help="ONNX: write the weights to OUT.data beside the graph "
              "(automatic when the input had external data, or past 2 GB).")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), metavar="SECONDS",
              help="ONNX: stop an onnxruntime call after this long [default: 300].")
@click.option("-q", "--quiet", is_flag=True, help="Print only the verdict line.")
@DEBUG
def fuse_command(model_path: Path, output: Path | None, input_shapes: tuple[str, ...], arch: str | None,
                 arch_kwargs: str | None, trust: bool, keep_structure: bool, atol: float | None,
                 rtol: float | None, seed: int, discovery: str, external_data: bool, timeout: float | None,
                 json_path: Path | None, quiet: bool, debug: bool) -> None:
    """Fold BatchNorm into conv/linear layers and prove output parity.

    \b
    The format is read from the file's content and kept: TorchScript in, TorchScript out; .pt2 in,
    .pt2 out; ONNX in, ONNX out (proven in onnxruntime with its optimisations off); pickled module in,
    pickled module out. A state dict (or .safetensors) with --arch is written as a .pt2 program, or
    with --keep-structure as a state dict for the same architecture.

    \b
    Beyond conv -> BN: re-parameterisable branches (RepVGG, MobileOne, FastViT's RepMixer) merge into
    one conv, and a BN after a Concat or an Add of convs folds into them (README: What folds). A
    pickled module whose branches merge comes back as a torch.fx GraphModule.

    \b
    Examples:
      bnfold fuse model.pt2                                  # a torch.export program carries its shapes
      bnfold fuse scripted.pt --input-shape 1,3,224,224      # TorchScript
      bnfold fuse model.onnx -o model.folded.onnx            # shapes from the graph
      bnfold fuse ckpt.pt --arch mypkg.nets:resnet18 --arch-kwargs '{"num_classes": 10}' \\
          --input-shape 8,3,224,224 -o resnet18.fused.pt2
      bnfold fuse models/resnet_digits.safetensors --arch models.zoo:resnet_digits --input-shape 8,1,8,8
    """
    _exit_through(lambda: _run_fuse(model_path, output, input_shapes, arch, arch_kwargs, trust,
                                    keep_structure, atol, rtol, seed, discovery, external_data, timeout, json_path,
                                    quiet), debug)


def _run_fuse(model_path: Path, output: Path | None, input_shapes: tuple[str, ...], arch: str | None,
              arch_kwargs: str | None, trust: bool, keep_structure: bool, atol: float | None,
              rtol: float | None, seed: int, discovery: str, external_data: bool, timeout: float | None,
              json_path: Path | None, quiet: bool) -> int:
    console = _stdout_console()
    status = _status_console()
    started = time.perf_counter()
    _tolerances(atol, rtol)
    specs = [parse_input_spec(s) for s in input_shapes]
    check_paths({"MODEL": model_path}, {"-o": output, "--json": json_path})
    loaded = _load(model_path, arch, arch_kwargs, trust, status)
    if loaded.format == "onnx":
        return _run_fuse_onnx(loaded.model, model_path, output, specs, atol, rtol, seed, external_data, timeout,
                              json_path, quiet, console, status, started)
    if external_data or timeout is not None:
        raise InputSpecError("--external-data and --timeout apply to ONNX files only",
                             "bnfold export writes ONNX files")
    specs = _input_specs(specs, loaded)
    if keep_structure and loaded.format not in ("state_dict", "safetensors"):
        raise InputSpecError("--keep-structure applies to state dicts and .safetensors files only",
                             f"{model_path} is a {loaded.format} file; its output keeps its format anyway")
    out_format = loaded.format if keep_structure or loaded.format not in ("state_dict", "safetensors") else "export"
    out_path = _output_path(model_path, out_format, output)
    check_paths({"MODEL": model_path}, {"-o": out_path, "--json": json_path})
    with status.status("folding and comparing"):
        result = fuse(loaded.model, specs, atol=atol, rtol=rtol, seed=seed, method=discovery,
                      keep_structure=keep_structure)
    result.notes[:0] = loaded.notes
    written = None
    if result.ok:
        with status.status(f"writing {escape(str(out_path))}"):
            save_model(result.model, out_format, out_path, make_inputs(specs, seed))
        written = str(out_path)
    result.timings["total"] = time.perf_counter() - started
    _report_fuse(result, console, model_path, written, json_path, quiet,
                 input={"path": str(model_path), "format": loaded.format, "shapes": [str(s) for s in specs]},
                 output={"path": written, "format": out_format if written else None})
    return exit_code(result)


def _report_fuse(result: FuseResult, console: Console, model_path: Path, written: str | None,
                 json_path: Path | None, quiet: bool, **document: Any) -> None:
    """The verdict line (-q) or the table and parity lines, and the JSON report."""
    if quiet:
        console.print(("PASSED" if result.ok else "FAILED") + f" | {len(result.folded)} folded, "
                      f"{len(result.skipped)} skipped" + (f" | wrote {escape(written)}" if written else ""),
                      soft_wrap=True)
    else:
        render_fuse(result, console, source=str(model_path), output=written)
    if json_path is not None:
        write_json(json_path, fuse_document(result, **document))


def _run_fuse_onnx(model: Any, model_path: Path, output: Path | None, specs: list, atol, rtol, seed: int,
                   external_data: bool, timeout: float | None, json_path: Path | None, quiet: bool, console: Console,
                   status: Console, started: float) -> int:
    from bnfold.onnx.fuse import fuse_onnx
    from bnfold.onnx.io import external_data_files, save_onnx

    out_path = _output_path(model_path, "onnx", output)
    data_path = out_path.with_name(out_path.name + ".data")
    data_files = external_data_files(model_path)
    inputs = {"MODEL": model_path, **{f"MODEL's data file {p.name}": p for p in data_files}}
    check_paths(inputs, {"-o": out_path, "external data": data_path, "--json": json_path})
    with status.status("folding and comparing in onnxruntime"):
        result = fuse_onnx(model, model_path, specs or None, atol=atol, rtol=rtol, seed=seed, timeout=timeout,
                           consume=True)
    written = None
    if result.ok:
        with status.status(f"writing {escape(str(out_path))}"):
            # external data when asked, or when the input had it (past 2 GB save_onnx decides by itself)
            files = save_onnx(result.model, out_path, external_data=external_data or bool(data_files))
        written = ", ".join(map(str, files))
    result.timings["total"] = time.perf_counter() - started
    _report_fuse(result, console, model_path, written, json_path, quiet,
                 input={"path": str(model_path), "format": "onnx"},
                 output={"path": str(out_path) if written else None, "format": "onnx" if written else None})
    return exit_code(result)


VERIFY_HELP = f"""Catch train/inference-mode bugs and prove ONNX parity: one CI gate.

    \b
    Probes the eval model (batch independence, determinism, finite outputs, modules left in training
    mode), checks BN statistics, folds and compares, exports to ONNX (or takes --onnx), lints the graph and
    compares onnxruntime with PyTorch at batch 1 and the given batch. Finding codes {code_range()} are listed
    in the README. Exit codes: 0 no error findings, 1 error findings, 2 could not run.

    \b
    A config that names code (arch, data = "module:function") runs only with --trust: a config cannot
    grant trust itself. On untrusted pull requests, run without --trust (README: Security).

    \b
    Examples:
      bnfold verify model.pt2                                  # by hand
      bnfold verify ckpt.pt --arch mypkg.nets:resnet18 --input-shape 8,3,224,224 --junit verify.xml
      bnfold verify model.onnx                                 # graph-only checks
      bnfold verify --trust                                    # CI: the models in pyproject.toml
    """


@main.command("verify", help=VERIFY_HELP)
@click.argument("model_path", metavar="[MODEL]", required=False, type=click.Path(path_type=Path, dir_okay=False))
@MODEL_OPTIONS
@click.option("--onnx", "onnx_path", type=click.Path(path_type=Path, dir_okay=False),
              help="Compare this existing ONNX file with the torch model instead of exporting one.")
@click.option("--exporter", type=click.Choice(["torchscript", "dynamo"]), default="torchscript", show_default=True,
              help="ONNX exporter: the TorchScript one is fast; dynamo (torch.export-based) needs onnxscript and "
                   "takes seconds.")
@click.option("--skip", "skip_checks", multiple=True, type=click.Choice(["audit", "fold", "onnx"]),
              help="Skip a group of checks (repeatable).")
@click.option("--disable", metavar="CODE[,CODE]", help="Finding codes to ignore, e.g. BN011,BN006.")
@ATOL
@RTOL
@SEED
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), metavar="SECONDS",
              help="Stop an onnxruntime call after this long and report it (BN010) [default: 300].")
@click.option("--data", "data_spec", metavar="PATH|MODULE:FUNCTION",
              help="Representative inputs (as for recalibrate): report stale running statistics (BN013).")
@click.option("--config", "config_path", type=click.Path(path_type=Path, dir_okay=False),
              help="pyproject.toml with [[tool.bnfold.models]] [default: the nearest one, when MODEL is omitted].")
@JSON
@click.option("--junit", "junit_path", type=click.Path(path_type=Path, dir_okay=False),
              help="Write JUnit XML (one test case per check per model) for CI dashboards.")
@click.option("--format", "output_format", type=click.Choice(["text", "github"]), default="text", show_default=True,
              help="github: also print GitHub Actions annotations (::error ...).")
@click.option("--timings", is_flag=True, help="Print the time spent in each stage.")
@click.option("-j", "--jobs", type=click.IntRange(min=1), default=1, show_default=True,
              help="Verify the config's models in this many worker processes (report order unchanged).")
@DEBUG
def verify_command(model_path: Path | None, input_shapes: tuple[str, ...], arch: str | None, arch_kwargs: str | None,
                   trust: bool, onnx_path: Path | None, exporter: str, skip_checks: tuple[str, ...],
                   disable: str | None, atol: float | None, rtol: float | None, seed: int, timeout: float | None,
                   data_spec: str | None, config_path: Path | None, json_path: Path | None, junit_path: Path | None,
                   output_format: str, timings: bool, jobs: int, debug: bool) -> None:
    _exit_through(lambda: _run_verify(model_path, input_shapes, arch, arch_kwargs, trust, onnx_path,
                                      exporter, skip_checks, disable, atol, rtol, seed, timeout, data_spec,
                                      config_path, json_path, junit_path, output_format, timings, jobs), debug)


def _run_verify(model_path, input_shapes, arch, arch_kwargs, trust, onnx_path, exporter, skip_checks,
                disable, atol, rtol, seed, timeout, data_spec, config_path, json_path, junit_path, output_format,
                timings, jobs) -> int:
    from bnfold.config import ModelConfig, find_pyproject, load_config
    from bnfold.report import github_annotations, junit_xml, render_verify, verify_document
    from bnfold.verify import CHECKS, verify

    _tolerances(atol, rtol)
    disabled = tuple(c.strip().upper() for c in (disable or "").split(",") if c.strip())
    pyproject = None
    if model_path is not None:
        configs = [ModelConfig(path=model_path, name=str(model_path), arch=arch, arch_kwargs=arch_kwargs,
                               input_specs=[parse_input_spec(s) for s in input_shapes], onnx=onnx_path,
                               exporter=exporter, disable=disabled, atol=atol, rtol=rtol, trust=trust, seed=seed,
                               data=data_spec, timeout=timeout)]
    else:
        pyproject = config_path or find_pyproject(Path.cwd())
        configs = load_config(pyproject, trust=trust)
    from bnfold.onnx.io import external_data_files

    inputs: dict[str, Path | None] = {"--config": pyproject}
    for cfg in configs:
        inputs.update({f"model {cfg.name}": cfg.path, f"--onnx of {cfg.name}": cfg.onnx})
        for graph in (cfg.path, cfg.onnx):
            if graph is not None:
                inputs.update({f"data file {p.name} of {cfg.name}": p for p in external_data_files(graph)})
        if cfg.data and Path(cfg.data).exists():
            inputs[f"--data of {cfg.name}"] = Path(cfg.data)
    check_paths(inputs, {"--json": json_path, "--junit": junit_path})
    status = _status_console()
    calls = [dict(model=cfg.path, example_inputs=cfg.input_specs or None, onnx=cfg.onnx, exporter=cfg.exporter,
                  checks=tuple(c for c in cfg.checks if c in CHECKS and c not in skip_checks),
                  disable=tuple(dict.fromkeys(cfg.disable + disabled)), atol=_first(atol, cfg.atol),
                  rtol=_first(rtol, cfg.rtol), seed=cfg.seed, arch=cfg.arch, arch_kwargs=cfg.arch_kwargs, trust=trust,
                  name=cfg.name, data=data_spec or cfg.data, timeout=_first(timeout, cfg.timeout), code_root=cfg.root)
             for cfg in configs]
    if jobs > 1 and len(calls) > 1:
        from bnfold.parallel import verify_many

        done: list[int] = []
        with status.status(f"verifying {len(calls)} models in {min(jobs, len(calls))} processes") as spinner:
            reports = verify_many(calls, jobs, on_done=lambda i: (done.append(i), spinner.update(
                f"verified {len(done)}/{len(calls)} models (last: {escape(configs[i].name)})")))
    else:
        reports = []
        for i, (cfg, call) in enumerate(zip(configs, calls), 1):
            with status.status(f"[{i}/{len(configs)}] verifying {escape(cfg.name)}"):
                reports.append(verify(**call))
    console = _stdout_console()
    render_verify(reports, console, timings=timings)
    if output_format == "github":
        text = github_annotations(reports)
        if text:
            click.echo(text)
    if json_path is not None:
        write_json(json_path, verify_document(reports))
    if junit_path is not None:
        from bnfold.save import write_atomic

        xml = junit_xml(reports)
        write_atomic(junit_path, lambda p: Path(p).write_text(xml, encoding="utf-8"))
    return EXIT_OK if reports and all(r.ok for r in reports) else EXIT_FAILED


def _first(*values: Any) -> Any:
    """The command line's value when given, else the config's."""
    return next((v for v in values if v is not None), None)


@main.command("export")
@click.argument("model_path", metavar="MODEL", type=click.Path(path_type=Path, dir_okay=False))
@click.option("-o", "--output", type=click.Path(path_type=Path, dir_okay=False),
              help="Where to write the ONNX file [default: MODEL's name with .onnx].")
@MODEL_OPTIONS
@click.option("--exporter", type=click.Choice(["dynamo", "torchscript"]), default="dynamo", show_default=True,
              help="dynamo: torch.export-based, maintained, refuses data-dependent control flow; torchscript: "
                   "fast, deprecated, records the branch its example input took.")
@click.option("--opset", type=click.IntRange(min=9, max=onnx_opset_version()),
              help="ONNX opset, 9 to the newest the installed onnx knows [default: the exporter's].")
@click.option("--static-batch", is_flag=True, help="Fix the batch size to the example's [default: symbolic].")
@click.option("--fp16", is_flag=True, help="Write a float16 graph (folded in float64 first, cast once).")
@click.option("--keep-io-types", is_flag=True, help="With --fp16: keep float32 inputs and outputs.")
@click.option("--external-data", is_flag=True, help="Write the weights to MODEL.onnx.data beside the graph "
              "(automatic past 2 GB).")
@click.option("--no-fold", "no_fold", is_flag=True, help="Export the model as it is (still verified).")
@click.option("--force", is_flag=True, help="Export despite audit errors (they are still printed).")
@ATOL
@RTOL
@SEED
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), metavar="SECONDS",
              help="Stop an onnxruntime call after this long [default: 300].")
@JSON
@click.option("-q", "--quiet", is_flag=True, help="Print only the verdict line.")
@DEBUG
def export_command(model_path: Path, output: Path | None, input_shapes: tuple[str, ...], arch: str | None,
                   arch_kwargs: str | None, trust: bool, exporter: str, opset: int | None, static_batch: bool,
                   fp16: bool, keep_io_types: bool, external_data: bool, no_fold: bool, force: bool,
                   atol: float | None, rtol: float | None, seed: int, timeout: float | None, json_path: Path | None,
                   quiet: bool, debug: bool) -> None:
    """Export to a folded ONNX file, proven against the PyTorch eval model.

    \b
    audit (errors stop it; --force) -> fold BatchNorm in PyTorch -> export -> fold what the exporter
    left in the graph -> onnx.checker -> onnxruntime vs the PyTorch eval model at batch 1 and the given
    batch -> atomic write. Nothing is written unless every stage passes (exit 1 then).

    \b
    Examples:
      bnfold export models/checkpoints/resnet_digits.safetensors --arch models.zoo:resnet_digits \\
          --input-shape 8,1,8,8 -o resnet_digits.onnx
      bnfold export model.pt2 -o model.onnx --fp16 --keep-io-types
      bnfold export scripted.pt --input-shape 1,3,224,224 --exporter torchscript --opset 17
    """
    _exit_through(lambda: _run_export(model_path, output, input_shapes, arch, arch_kwargs, trust, exporter, opset,
                                      static_batch, fp16, keep_io_types, external_data, no_fold, force, atol, rtol,
                                      seed, timeout, json_path, quiet), debug)


def _run_export(model_path, output, input_shapes, arch, arch_kwargs, trust, exporter, opset, static_batch, fp16,
                keep_io_types, external_data, no_fold, force, atol, rtol, seed, timeout, json_path, quiet) -> int:
    from bnfold.export import export
    from bnfold.report import export_document, render_export

    _tolerances(atol, rtol)
    specs = [parse_input_spec(s) for s in input_shapes]
    out_path = output or model_path.with_suffix(".onnx")
    data_path = out_path.with_name(out_path.name + ".data")
    check_paths({"MODEL": model_path}, {"-o": out_path, "external data": data_path, "--json": json_path})
    status = _status_console()
    loaded = _load(model_path, arch, arch_kwargs, trust, status)
    if loaded.format == "onnx":
        raise InputSpecError(f"{model_path} is already an ONNX graph: there is nothing to export",
                             f"bnfold fuse {model_path} folds it and proves the result in onnxruntime")
    specs = _input_specs(specs, loaded)
    with status.status("auditing, folding, exporting and comparing"):
        result = export(loaded.model, specs, out_path, exporter=exporter, opset=opset, static_batch=static_batch,
                        fp16=fp16, keep_io_types=keep_io_types, external_data=external_data, fold=not no_fold,
                        force=force, atol=atol, rtol=rtol, seed=seed, timeout=timeout)
    result.notes[:0] = loaded.notes
    render_export(result, _stdout_console(), source=str(model_path), quiet=quiet)
    if json_path is not None:
        write_json(json_path, export_document(result, input={"path": str(model_path), "format": loaded.format,
                                                             "shapes": [str(s) for s in specs]}))
    return EXIT_OK if result.ok else EXIT_FAILED


@main.command("inspect")
@click.argument("model_path", metavar="MODEL", type=click.Path(path_type=Path, dir_okay=False))
@MODEL_OPTIONS
@click.option("--data", "data_spec", metavar="PATH|MODULE:FUNCTION",
              help="Representative inputs (as for recalibrate): also show each BN's drift from the data's population "
                   "statistics (eager models).")
@JSON
@click.option("--plot", "plot_path", type=click.Path(path_type=Path, dir_okay=False), metavar="PATH.png",
              help='Also draw the figures as one PNG (needs matplotlib: pip install "bnfold[plot]").')
@DEBUG
def inspect_command(model_path: Path, input_shapes: tuple[str, ...], arch: str | None, arch_kwargs: str | None,
                    trust: bool, data_spec: str | None, json_path: Path | None, plot_path: Path | None,
                    debug: bool) -> None:
    """Show every BatchNorm: its fold plan, statistics and risks (no verdict: that is verify).

    \b
    One row per BN in forward order: producer -> BN -> consumers, what bnfold fuse would do with it (fold
    into which layer, or why not), eps, momentum, num_batches_tracked, running mean/var and gamma ranges, the
    largest weight magnification |gamma|/sqrt(var+eps) and its channel, dead channels (gamma 0) and risk
    flags. With --data, the drift of each BN's statistics from the data's, worst first. Every format bnfold
    reads, ONNX included. Exit codes: 0 inspected, 2 bad input.

    \b
    Examples:
      bnfold inspect models/checkpoints/resnet_digits.safetensors --arch models.zoo:resnet_digits \\
          --input-shape 8,1,8,8 --plot bn.png
      bnfold inspect model.onnx --json bn.json                # statistics from the initializers
      bnfold inspect ckpt.pt --arch mypkg.nets:resnet18 --input-shape 8,3,224,224 --data calib.npz
    """
    _exit_through(lambda: _run_inspect(model_path, input_shapes, arch, arch_kwargs, trust, data_spec, json_path,
                                       plot_path), debug)


def _run_inspect(model_path: Path, input_shapes: tuple[str, ...], arch: str | None, arch_kwargs: str | None,
                 trust: bool, data_spec: str | None, json_path: Path | None, plot_path: Path | None) -> int:
    from bnfold.inspect import inspect
    from bnfold.report import inspect_document, render_inspect

    specs = [parse_input_spec(s) for s in input_shapes]
    data_path = Path(data_spec) if data_spec and Path(data_spec).exists() else None
    check_paths({"MODEL": model_path, "--data": data_path}, {"--json": json_path, "--plot": plot_path})
    if plot_path is not None:
        from bnfold.plot import require_matplotlib

        if plot_path.suffix.lower() != ".png":
            raise OutputError(f"--plot {plot_path}: bnfold draws PNG files", f"name it {plot_path.stem}.png")
        require_matplotlib()  # before the work, not after it
    status = _status_console()
    loaded = _load(model_path, arch, arch_kwargs, trust, status)
    specs = specs if loaded.format == "onnx" else _input_specs(specs, loaded)  # a graph declares its inputs
    with status.status("inspecting" + (" and measuring drift" if data_spec else "")):
        report = inspect(loaded.model, specs or None, data=data_spec)
    report.notes[:0] = loaded.notes
    render_inspect(report, _stdout_console(), source=str(model_path))
    if json_path is not None:
        write_json(json_path, inspect_document(report, input={"path": str(model_path), "format": loaded.format,
                                                              "shapes": [str(s) for s in specs]}))
    if plot_path is not None:
        from bnfold.plot import plot_inspect

        with status.status(f"drawing {escape(str(plot_path))}"):
            plot_inspect(report, plot_path, title=f"BatchNorm inspection: {model_path.name} ({loaded.format})")
    return EXIT_OK


@main.command("recalibrate")
@click.argument("model_path", metavar="MODEL", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--data", "data_spec", required=True, metavar="PATH|MODULE:FUNCTION",
              help="Calibration inputs: .npy, .npz (array x), an image folder, or module:function returning batches.")
@click.option("-o", "--output", type=click.Path(path_type=Path, dir_okay=False),
              help="Where to write the model [default: MODEL's name with .recal before the suffix].")
@click.option("--samples", type=click.IntRange(min=1), help="Use at most this many inputs (per process under "
              "torchrun).")
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True,
              help="Batch size for array and image data.")
@click.option("--method", type=click.Choice(["layerwise", "global"]), default="layerwise", show_default=True,
              help="layerwise: one eval-mode pass per BN, each sees what it will see at inference (exact); "
                   "global: one pass with batch statistics (fvcore/AIMET).")
@ARCH
@ARCH_KWARGS
@TRUST
@JSON
@DEBUG
def recalibrate_command(model_path: Path, data_spec: str, output: Path | None, samples: int | None, batch_size: int,
                        method: str, arch: str | None, arch_kwargs: str | None, trust: bool,
                        json_path: Path | None, debug: bool) -> None:
    """Re-estimate BN running statistics as population statistics of the data ("precise BN").

    \b
    The model is frozen (weights, dropout, momentum untouched); only running_mean/running_var change.
    Prints, per BN, how far the old statistics were from the new ones, and how much the outputs moved.
    Under torchrun every process reads its shard and the statistics are all-reduced.

    \b
    Examples:
      bnfold recalibrate ckpt.safetensors --arch models.zoo:resnet_digits --data digits.npy
      bnfold recalibrate model.pt --trust --data calib.npz -o model.recal.pt --samples 4096   # a whole pickle
      torchrun --nproc-per-node 2 -m bnfold.cli recalibrate ckpt.pt --arch ... --data calib.npz -o out.pt
    """
    _exit_through(lambda: _run_recalibrate(model_path, data_spec, output, samples, batch_size, method, arch,
                                           arch_kwargs, trust, json_path), debug)


def _run_recalibrate(model_path, data_spec, output, samples, batch_size, method, arch, arch_kwargs, trust,
                     json_path) -> int:
    from rich.table import Table

    from bnfold.data import load_data
    from bnfold.recalibrate import recalibrate

    out_path = output or model_path.with_name(f"{model_path.stem}.recal{model_path.suffix}")
    data_path = Path(data_spec) if Path(data_spec).exists() else None
    check_paths({"MODEL": model_path, "--data": data_path}, {"-o": out_path, "--json": json_path})
    distributed = _init_distributed()
    loaded = load(model_path, arch=arch, arch_kwargs=arch_kwargs, trust=trust)
    if loaded.format not in ("pickle", "state_dict", "safetensors"):
        raise InputSpecError(f"{model_path} is a {loaded.format} file: recalibration needs an eager model",
                             "pass a state dict with --arch, or a pickled module")
    dtype = next((p.dtype for p in loaded.model.parameters()), torch.float32)
    try:
        with _status_console().status("recalibrating"):
            result = recalibrate(loaded.model, load_data(data_spec, batch_size, dtype), samples=samples,
                                 method=method)
    finally:
        if distributed:
            import torch.distributed as dist

            rank_zero = _is_rank_zero()
            dist.destroy_process_group()
    if distributed and not rank_zero:
        return EXIT_OK
    save_model(result.model, loaded.format, out_path)
    console = _stdout_console()
    table = Table("BatchNorm", "values/channel", "max mean shift (std)", "max var ratio",
                  title=f"Recalibrated on {result.samples} inputs ({result.method})", title_justify="left")
    for layer in sorted(result.layers, key=lambda d: d.score, reverse=True):
        table.add_row(escape(layer.name), str(layer.samples), f"{layer.mean_shift:.3g}", f"{layer.var_ratio:.3g}")
    console.print(table)
    for name, reason in result.skipped:
        console.print(f"skipped {escape(name)}: {escape(reason)}", soft_wrap=True)
    console.print(f"outputs moved by up to {result.output_change:.3g} (relative to their scale) | wrote "
                  f"{escape(str(out_path))}", soft_wrap=True)
    if json_path is not None:
        write_json(json_path, {"schema_version": 1, "command": "recalibrate", "output": str(out_path),
                               **result.to_dict()})
    return EXIT_OK


def _init_distributed() -> bool:
    """Join the process group when started by torchrun (WORLD_SIZE > 1): gloo on CPU."""
    import os

    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        return True
    return dist.is_initialized()


def _is_rank_zero() -> bool:
    import torch.distributed as dist

    return not dist.is_initialized() or dist.get_rank() == 0


if __name__ == "__main__":  # pragma: no cover
    main()
