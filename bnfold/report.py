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
from bnfold.fuse import FuseResult
from bnfold.save import write_atomic

SCHEMA_VERSION = 1


def _fmt(x: float) -> str:
    return "inf" if math.isinf(x) else "nan" if math.isnan(x) else f"{x:.3g}"


def parity_line(comparison: Comparison, diff: OutputDiff) -> str:
    """``PASSED | batch 8 | output | max abs 1.2e-07, max rel 9.1e-08 at (0, 3) ...`` (Polygraphy-style)."""
    verdict = "PASSED" if diff.passed else "FAILED"
    where = f" at {diff.worst_index}" if diff.worst_index else ""
    problem = f" | {diff.problem}" if diff.problem else ""
    return (f"{verdict} | {comparison.label} | {diff.name} | max abs {_fmt(diff.max_abs)}, max rel {_fmt(diff.max_rel)}"
            f"{where} (ref {diff.ref_value:.6g}, got {diff.got_value:.6g}), mean abs {_fmt(diff.mean_abs)} | "
            f"atol {diff.atol:g}, rtol {diff.rtol:g} (min rtol to pass {_fmt(diff.required_rtol)}){problem}")


def render_fuse(result: FuseResult, console: Console, *, source: str, output: str | None) -> None:
    table = Table(title=f"BatchNorm folding: {escape(source)}", title_justify="left", expand=False)
    table.add_column("BatchNorm", style="bold")
    table.add_column("status")
    table.add_column("into / reason", overflow="fold")
    for fold in result.folded:
        arrow = f"{fold.layer.name} ({fold.layer.kind}, BN {fold.position})"
        table.add_row(escape(fold.bn.name), "[green]folded[/green]", escape(arrow))
    for skip in result.skipped:
        table.add_row(escape(skip.bn), "[yellow]skipped[/yellow]", escape(skip.reason))
    if result.folded or result.skipped:
        console.print(table)
    else:
        console.print("No BatchNorm layers found.")
    for note in result.notes:
        console.print(f"Note: {escape(note)}", highlight=False, soft_wrap=True)
    if result.was_training:
        console.print("Note: the model was handed over in training mode; it was folded and compared in eval mode",
                      highlight=False, soft_wrap=True)
    for comparison in result.parity:
        for diff in comparison.outputs:
            style = "green" if diff.passed else "red"
            console.print(f"[{style}]{escape(parity_line(comparison, diff))}[/{style}]", highlight=False,
                          soft_wrap=True)
    summary = f"{len(result.folded)} folded, {len(result.skipped)} skipped (discovery: {result.discovery})"
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
                              escape(f.message), escape(f.hint))
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
            message = f"{report.model}: {where}{f.message}. {f.hint}".replace("%", "%25").replace("\n", "%0A")
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
            console.print(f"[{style}]{finding.code} {finding.severity}[/{style}] {where}: {escape(finding.message)}",
                          highlight=False, soft_wrap=True)
        for comparison in result.parity:
            for diff in comparison.outputs:
                style = "green" if diff.passed else "red"
                console.print(f"[{style}]{escape(parity_line(comparison, diff))}[/{style}]", highlight=False,
                              soft_wrap=True)
        for skip in result.left:
            console.print(f"left in the graph: {escape(skip.bn)}: {escape(skip.reason)}", highlight=False,
                          soft_wrap=True)
        for note in result.notes:
            console.print(f"Note: {escape(note)}", highlight=False, soft_wrap=True)
    torch_folds = len(result.torch_fold.folded) if result.torch_fold else 0
    summary = (f"{source} -> ONNX ({result.exporter}) | {torch_folds} BN folded in PyTorch, {len(result.graph_folded)} "
               f"in the graph, {len(result.left)} left")
    if result.ok:
        console.print(f"[green]PASSED[/green] | {escape(summary)} | wrote {escape(', '.join(result.files))}",
                      highlight=False, soft_wrap=True)
    else:
        console.print(f"[red]FAILED[/red] | {escape(summary)} | stopped at {result.stopped or 'parity'}: nothing "
                      "written", highlight=False, soft_wrap=True)


def export_document(result: Any, **context: Any) -> dict[str, Any]:
    return {"schema_version": SCHEMA_VERSION, "command": "export", **context, **result.to_dict()}
