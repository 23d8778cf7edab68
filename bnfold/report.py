"""Render a fuse run: a terminal table (rich) and a JSON document. Rendering only, no decisions."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any
from xml.etree import ElementTree as ET

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from bnfold.compare import Comparison, OutputDiff
from bnfold.fold.result import FuseResult
from bnfold.inspect import FLAGS
from bnfold.save import write_atomic

SCHEMA_VERSION = 1


def _fmt(x: float) -> str:
    return "inf" if math.isinf(x) else "nan" if math.isnan(x) else f"{x:.3g}"


def parity_line(comparison: Comparison, diff: OutputDiff) -> str:
    """``PASSED | batch 8 | output | max abs 1.2e-07, max rel 9.1e-08 at (0, 3) ...`` (Polygraphy-style)."""
    verdict = "PASSED" if diff.passed else "FAILED"
    where = f" at {diff.worst_index}" if diff.worst_index else ""
    problem = f" | {diff.problem}" if diff.problem else ""
    # A max rel above 0 with a min rtol of 0: every element passed by atol alone; say so, not a contradiction.
    within = ", every element within atol" if diff.required_rtol == 0 and diff.max_abs > 0 else ""
    return (f"{verdict} | {comparison.label} | {diff.name} | max abs {_fmt(diff.max_abs)}, max rel {_fmt(diff.max_rel)}"
            f"{where} (ref {diff.ref_value:.6g}, got {diff.got_value:.6g}), mean abs {_fmt(diff.mean_abs)} | "
            f"atol {diff.atol:g}, rtol {diff.rtol:g} (min rtol to pass {_fmt(diff.required_rtol)}{within}){problem}")


def print_parity(console: Console, comparisons: list[Comparison]) -> None:
    """One Polygraphy-style line per output and case, green when it passed."""
    for comparison in comparisons:
        for diff in comparison.outputs:
            style = "green" if diff.passed else "red"
            console.print(f"[{style}]{escape(parity_line(comparison, diff))}[/{style}]", highlight=False,
                          soft_wrap=True)


def fuse_counts(result: FuseResult) -> str:
    """``3 folded, 2 affine folded, 1 skipped``: BN folds, affine tails (when there are any), skips."""
    affine = f", {len(result.affine)} affine folded" if result.affine else ""
    return f"{len(result.folded)} folded{affine}, {len(result.skipped)} skipped"


def render_fuse(result: FuseResult, console: Console, *, source: str, output: str | None) -> None:
    table = Table(title=f"BatchNorm folding: {escape(source)}", title_justify="left", expand=False)
    table.add_column("BatchNorm", style="bold")
    table.add_column("status")
    table.add_column("into / reason", overflow="fold")
    for fold in result.folded:
        if fold.merge is None and not fold.parts:
            arrow = f"{fold.layer.name} ({fold.layer.kind}, BN {fold.position})"
            table.add_row(escape(fold.bn.name), "[green]folded[/green]", escape(arrow))
        else:
            status = "[green]merged[/green]" if fold.merge is not None else "[green]folded[/green]"
            table.add_row(escape(fold.bn.name), status, escape(fold.describe()))
    for affine in result.affine:
        table.add_row(escape(affine.name), "[green]folded[/green]", escape(f"affine: {affine.describe()}"))
    for skip in result.skipped:
        table.add_row(escape(skip.bn), "[yellow]skipped[/yellow]", escape(skip.reason))
    if result.folded or result.skipped or result.affine:
        console.print(table)
    else:
        console.print("No BatchNorm layers found.")
    for note in result.notes:
        console.print(f"Note: {escape(note)}", highlight=False, soft_wrap=True)
    if result.was_training:
        console.print("Note: the model was handed over in training mode; it was folded and compared in eval mode",
                      highlight=False, soft_wrap=True)
    print_parity(console, result.parity)
    summary = f"{fuse_counts(result)} (discovery: {result.discovery})"
    if result.ok:
        console.print(f"[green]PASSED[/green] | {summary}" + (f" | wrote {escape(output)}" if output else ""),
                      highlight=False,
                      soft_wrap=True)
    else:
        console.print(f"[red]FAILED[/red] | {summary} | parity outside tolerance, nothing written", highlight=False,
                      soft_wrap=True)


def fuse_document(result: FuseResult, **context: Any) -> dict[str, Any]:
    return {"schema_version": SCHEMA_VERSION, "command": "fuse", **context, **result.to_dict()}


def write_json(path: Path, document: dict[str, Any]) -> None:
    text = json.dumps(_finite(document), indent=2, default=str, allow_nan=False)
    write_atomic(path, lambda p: Path(p).write_text(text + "\n", encoding="utf-8"))


def _finite(value: Any) -> Any:
    """JSON has no inf/nan: write them as the strings "inf", "-inf", "nan"."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


# -- verify ----------------------------------------------------------------------------------------------------
def render_verify(reports: list[Any], console: Console, *, timings: bool = False) -> None:
    for report in reports:
        console.print(f"[bold]{escape(report.model)}[/bold]", highlight=False, soft_wrap=True)
        for check in report.checks:
            verdict = "[green]PASSED[/green]" if check.passed else "[red]FAILED[/red]"
            console.print(f"  {verdict} | {check.name} | {escape(check.detail)}", highlight=False, soft_wrap=True)
        for comparison in report.parity:
            for diff in comparison.outputs:
                if not diff.passed:
                    console.print(f"  [red]{escape(parity_line(comparison, diff))}[/red]", highlight=False,
                                  soft_wrap=True)
        if report.findings:
            table = Table(show_header=True, expand=False, title_justify="left")
            for column in ("code", "severity", "module", "message", "hint"):
                table.add_column(column, overflow="fold")
            for f in report.findings:
                style = "red" if f.severity == "error" else "yellow"
                table.add_row(f.code, f"[{style}]{f.severity}[/{style}]", escape(f.module or "(model)"),
                              escape(f.detail), escape(f.hint))
            console.print(table)
        for note in report.notes:
            console.print(f"  Note: {escape(note)}", highlight=False, soft_wrap=True)
        if timings:
            table = Table("stage", "seconds", "share", title="timings", title_justify="left")
            total = report.timings.get("total", 0.0) or 1.0
            for stage, seconds in report.timings.items():
                if stage != "total":
                    table.add_row(stage, f"{seconds:.3f}", f"{100 * seconds / total:.0f}%")
            table.add_row("total", f"{report.timings.get('total', 0.0):.3f}", "100%")
            console.print(table)
    errors = sum(len(r.errors) for r in reports)
    warnings = sum(len(r.findings) - len(r.errors) for r in reports)
    verdict = "[green]PASSED[/green]" if all(r.ok for r in reports) else "[red]FAILED[/red]"
    console.print(f"{verdict} | {len(reports)} model(s), {errors} error(s), {warnings} warning(s)", highlight=False,
                  soft_wrap=True)


def verify_document(reports: list[Any]) -> dict[str, Any]:
    return {
        "schema_version": SCHEMA_VERSION,
        "command": "verify",
        "ok": bool(reports) and all(r.ok for r in reports),
        "findings": [{"model": r.model, **f.to_dict()} for r in reports for f in r.findings],
        "checks": [{"model": r.model, **c.to_dict()} for r in reports for c in r.checks],
        "models": [r.to_dict() for r in reports],
    }


def junit_xml(reports: list[Any]) -> str:
    """One <testsuite> per model, one <testcase> per check; findings become <failure>s of their check."""
    suites = ET.Element("testsuites", name="bnfold verify")
    for report in reports:
        cases = [(c.name, c.passed, c.detail, c.seconds) for c in report.checks]
        failures = sum(1 for name, passed, *_ in cases if not passed or _errors_of(report, name))
        suite = ET.SubElement(suites, "testsuite", name=report.model, tests=str(len(cases)), failures=str(failures),
                              time=f"{report.timings.get('total', 0.0):.3f}")
        for name, passed, detail, seconds in cases:
            case = ET.SubElement(suite, "testcase", classname=report.model, name=name, time=f"{seconds:.3f}")
            errors = _errors_of(report, name)
            if not passed or errors:
                failure = ET.SubElement(case, "failure", message=detail)
                failure.text = "\n".join(str(f) for f in errors) or detail
            warnings = [f for f in report.findings if f.check_name == name and f.severity == "warning"]
            if warnings:
                ET.SubElement(case, "system-out").text = "\n".join(str(f) for f in warnings)
    return ET.tostring(suites, encoding="unicode", xml_declaration=True)


def _errors_of(report: Any, check: str) -> list[Any]:
    return [f for f in report.errors if f.check_name == check]


def github_annotations(reports: list[Any]) -> str:
    """GitHub Actions workflow commands: one ::error/::warning line per finding."""
    lines = []
    for report in reports:
        for f in report.findings:
            where = f"{f.module}: " if f.module else ""
            message = f"{report.model}: {where}{f.detail}. {f.hint}".replace("%", "%25").replace("\n", "%0A")
            lines.append(f"::{f.severity} title={f.code}::{message}")
        for check in report.checks:
            if not check.passed and not _errors_of(report, check.name):
                lines.append(f"::error title={check.name}::{report.model}: {check.detail}")
    return "\n".join(lines)


# -- export -------------------------------------------------------------------------------------------------------
def render_export(result: Any, console: Console, *, source: str, quiet: bool = False) -> None:
    """One line per output and batch (Polygraphy-style), the BatchNorms left in the graph with their reasons,
    then the verdict."""
    if not quiet:
        for finding in result.findings:
            style = "red" if finding.severity == "error" else "yellow"
            where = escape(finding.module or "(model)")
            console.print(f"[{style}]{finding.code} {finding.severity}[/{style}] {where}: {escape(finding.detail)}",
                          highlight=False, soft_wrap=True)
        print_parity(console, result.parity)
        for skip in result.left:
            console.print(f"left in the graph: {escape(skip.bn)}: {escape(skip.reason)}", highlight=False,
                          soft_wrap=True)
        for note in result.notes:
            console.print(f"Note: {escape(note)}", highlight=False, soft_wrap=True)
    torch_folds = len(result.torch_fold.folded) if result.torch_fold else 0
    summary = (f"{source} -> ONNX ({result.exporter}) | {torch_folds} BN folded in PyTorch, {len(result.graph_folded)} "
               f"in the graph, {len(result.left)} left" + (f", {len(result.graph_affine)} affine folded in the graph"
                                                           if result.graph_affine else ""))
    if result.ok:
        console.print(f"[green]PASSED[/green] | {escape(summary)} | wrote {escape(', '.join(result.files))}",
                      highlight=False, soft_wrap=True)
    else:
        console.print(f"[red]FAILED[/red] | {escape(summary)} | stopped at {result.stopped or 'parity'}: nothing "
                      "written", highlight=False, soft_wrap=True)


def export_document(result: Any, **context: Any) -> dict[str, Any]:
    return {"schema_version": SCHEMA_VERSION, "command": "export", **context, **result.to_dict()}


# -- inspect ------------------------------------------------------------------------------------------------------
def _range(low: float | None, high: float | None) -> str:
    return "-" if low is None or high is None else f"{_fmt(low)}..{_fmt(high)}"


def _optional(value: Any, fmt: Any = str) -> str:
    return "-" if value is None else fmt(value)


def _bn_cell(row: Any) -> str:
    """The BN's name, and below it what feeds it and what reads it."""
    if row.producer is None:
        return f"[bold]{escape(row.name)}[/bold]"
    flow = f"{row.producer} -> BN -> {', '.join(row.consumers) or 'nothing'}"
    return f"[bold]{escape(row.name)}[/bold]\n[dim]{escape(flow)}[/dim]"


def _plan_cell(row: Any) -> str:
    """``folds into conv1 (conv, BN after)`` (+ the BNs merged into the same layer), or ``left: reason``."""
    if row.fold is None:
        return f"[yellow]left[/yellow]: {escape(row.reason or '')}"
    if row.fold.merge is not None or row.fold.parts:
        cell = f"[green]folds[/green]: {escape(row.fold.describe())}"
    else:
        layer = row.fold.layer
        cell = f"[green]folds[/green] into {escape(layer.name)} ({layer.kind}, BN {row.fold.position})"
    if row.merged_with:
        cell += f", merged with {escape(', '.join(row.merged_with))}"
    return cell


def _statistics_cells(row: Any) -> tuple[str, str, str, str, str]:
    """channels; eps / momentum / tracked; mean / var / gamma ranges; max magnification (channel); dead."""
    fig = row.figures
    settings = "\n".join((_optional(row.eps, lambda e: f"{e:.3g}"), _optional(row.momentum, lambda m: f"{m:g}"),
                          _optional(row.num_batches_tracked)))
    if fig is None:
        return "-", settings, "-", "-", "-"
    ranges = "\n".join((_range(fig.mean_min, fig.mean_max), _range(fig.var_min, fig.var_max),
                        _range(fig.gamma_min, fig.gamma_max)))
    magnif = f"{_fmt(fig.magnification_max)} ({fig.magnification_channel})"
    return str(fig.channels), settings, ranges, magnif, str(fig.dead_channels)


def render_inspect(report: Any, console: Console, *, source: str) -> None:
    """One row per BN in forward order, the drift (worst first) when measured, the flags' meanings, the summary
    line. No verdict: inspect never judges."""
    table = Table(title=f"BatchNorm inspection: {escape(source)} ({report.kind}, discovery: {report.discovery})",
                  title_justify="left", expand=False, show_lines=True)
    table.add_column("BatchNorm\n[dim]producer -> BN -> consumers[/dim]", overflow="fold", ratio=3)
    table.add_column("plan", overflow="fold", ratio=3, min_width=20)
    for header in ("ch", "eps\nmomentum\ntracked", "running mean\nrunning var\ngamma", "max magnif.\n(channel)",
                   "dead"):
        table.add_column(header, justify="right", no_wrap=True)
    table.add_column("risk", overflow="fold", no_wrap=False)
    for row in report.rows:
        risk = "\n".join(f"[red]{escape(code)}[/red]" for code in row.flags) or escape(row.note or "")
        table.add_row(_bn_cell(row), _plan_cell(row), *_statistics_cells(row), risk)
    if report.rows:
        console.print(table)
    else:
        console.print("No BatchNorm layers found.")
    if report.drift is not None:
        drift = Table("BatchNorm", "values/channel", "max mean shift (std)", "max var ratio", title_justify="left",
                      title=f"Drift from the data's statistics ({report.drift_samples} inputs), worst first")
        for d in report.drift:
            drift.add_row(escape(d.name), str(d.samples), _fmt(d.mean_shift), _fmt(d.var_ratio))
        console.print(drift)
    for code in dict.fromkeys(code for row in report.rows for code in row.flags):
        console.print(f"[red]{code}[/red]: {escape(FLAGS[code])}", highlight=False, soft_wrap=True)
    for note in report.notes:
        console.print(f"Note: {escape(note)}", highlight=False, soft_wrap=True)
    console.print(escape(inspect_summary_line(report.summary)), highlight=False, soft_wrap=True)


def inspect_summary_line(summary: Any) -> str:
    """``13 BatchNorm(s): 7 foldable, 6 left (5 not-adjacent; 1 padding), 2 risky``: left BNs counted by reason code."""
    groups = "; ".join(f"{count} {code}" for code, count in summary.left.items())
    left = f"{sum(summary.left.values())} left" + (f" ({groups})" if groups else "")
    return f"{summary.bns} BatchNorm(s): {summary.foldable} foldable, {left}, {summary.risky} risky"


def inspect_document(report: Any, **context: Any) -> dict[str, Any]:
    return {"schema_version": SCHEMA_VERSION, "command": "inspect", **context, **report.to_dict()}


def render_recalibrate(result: Any, console: Console, *, output: str | None) -> None:
    """Per BN, how far the old statistics were from the new ones (worst first), the skips, how far outputs moved."""
    table = Table("BatchNorm", "values/channel", "max mean shift (std)", "max var ratio",
                  title=f"Recalibrated on {result.samples} inputs ({result.method})", title_justify="left")
    for layer in sorted(result.layers, key=lambda d: d.score, reverse=True):
        table.add_row(escape(layer.name), str(layer.samples), f"{layer.mean_shift:.3g}", f"{layer.var_ratio:.3g}")
    console.print(table)
    for name, reason in result.skipped:
        console.print(f"skipped {escape(name)}: {escape(reason)}", soft_wrap=True)
    console.print(f"outputs moved by up to {result.output_change:.3g} (relative to their scale) | wrote "
                  f"{escape(str(output))}", soft_wrap=True)
