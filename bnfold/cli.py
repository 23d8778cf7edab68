"""The ``bnfold`` command line: parse, call the library, render, exit through :func:`exit_code`."""

from __future__ import annotations

import signal
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import click
from onnx.defs import onnx_opset_version
from rich.console import Console
from rich.markup import escape

from bnfold import __version__
from bnfold.commands import export_file, fuse_file, inspect_file, recalibrate_file, verify_files
from bnfold.errors import BnfoldError, first_line
from bnfold.findings import code_range
from bnfold.fold.result import FuseResult
from bnfold.options import ExportOptions, FuseOptions, InspectOptions, RecalibrateOptions, VerifyOptions, from_cli
from bnfold.report import (export_document, fuse_counts, fuse_document, github_annotations, inspect_document,
                           junit_xml, render_export, render_fuse, render_inspect, render_recalibrate, render_verify,
                           verify_document, write_json)
from bnfold.save import write_atomic
from bnfold.signals import Terminated, handle_signals

#: Exit codes (API, documented in the README). 130/143: interrupted by Ctrl-C / SIGTERM (128 + the signal).
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
EXIT_INTERRUPTED, EXIT_TERMINATED = 128 + signal.SIGINT, 128 + signal.SIGTERM


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


class _Spinner:
    """The library's progress (:data:`bnfold.options.Progress`) as a spinner on stderr; messages are plain text."""

    def __init__(self, message: str) -> None:
        self._status = _status_console().status(escape(message))

    def __enter__(self) -> _Spinner:
        self._status.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._status.__exit__(*exc)

    def update(self, message: str) -> None:
        self._status.update(escape(message))


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
def fuse_command(debug: bool, quiet: bool, **params: Any) -> None:
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
    _exit_through(lambda: _run_fuse(from_cli(FuseOptions, params), quiet), debug)


def _run_fuse(options: FuseOptions, quiet: bool) -> int:
    run = fuse_file(options, _Spinner)
    _report_fuse(run.result, _stdout_console(), options.model.model_path, run.written, options.json_path, quiet,
                 input=run.input, output=run.output)
    return exit_code(run.result)


def _report_fuse(result: FuseResult, console: Console, model_path: Path, written: str | None,
                 json_path: Path | None, quiet: bool, **document: Any) -> None:
    """The verdict line (-q) or the table and parity lines, and the JSON report."""
    if quiet:
        console.print(("PASSED" if result.ok else "FAILED") + f" | {fuse_counts(result)}"
                      + (f" | wrote {escape(written)}" if written else ""), soft_wrap=True)
    else:
        render_fuse(result, console, source=str(model_path), output=written)
    if json_path is not None:
        write_json(json_path, fuse_document(result, **document))


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
def verify_command(debug: bool, output_format: str, timings: bool, **params: Any) -> None:
    _exit_through(lambda: _run_verify(from_cli(VerifyOptions, params), output_format, timings), debug)


def _run_verify(options: VerifyOptions, output_format: str, timings: bool) -> int:
    reports = verify_files(options, _Spinner)
    render_verify(reports, _stdout_console(), timings=timings)
    if output_format == "github":
        text = github_annotations(reports)
        if text:
            click.echo(text)
    if options.json_path is not None:
        write_json(options.json_path, verify_document(reports))
    if options.junit_path is not None:
        xml = junit_xml(reports)
        write_atomic(options.junit_path, lambda p: Path(p).write_text(xml, encoding="utf-8"))
    return EXIT_OK if reports and all(r.ok for r in reports) else EXIT_FAILED


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
def export_command(debug: bool, quiet: bool, **params: Any) -> None:
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
    _exit_through(lambda: _run_export(from_cli(ExportOptions, params), quiet), debug)


def _run_export(options: ExportOptions, quiet: bool) -> int:
    run = export_file(options, _Spinner)
    render_export(run.result, _stdout_console(), source=str(options.model.model_path), quiet=quiet)
    if options.json_path is not None:
        write_json(options.json_path, export_document(run.result, input=run.input))
    return EXIT_OK if run.result.ok else EXIT_FAILED


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
def inspect_command(debug: bool, **params: Any) -> None:
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
    _exit_through(lambda: _run_inspect(from_cli(InspectOptions, params)), debug)


def _run_inspect(options: InspectOptions) -> int:
    run = inspect_file(options, _Spinner)
    render_inspect(run.result, _stdout_console(), source=str(options.model.model_path))
    if options.json_path is not None:
        write_json(options.json_path, inspect_document(run.result, input=run.input))
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
def recalibrate_command(debug: bool, **params: Any) -> None:
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
    _exit_through(lambda: _run_recalibrate(from_cli(RecalibrateOptions, params)), debug)


def _run_recalibrate(options: RecalibrateOptions) -> int:
    run = recalibrate_file(options, _Spinner)
    if run is not None:  # None: a torchrun process other than rank 0
        render_recalibrate(run.result, _stdout_console(), output=run.written)
    return EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    main()
