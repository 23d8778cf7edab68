"""Render a fuse run: a terminal table (rich) and a JSON document. Rendering only, no decisions."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from rich.console import Console
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
    table = Table(title=f"BatchNorm folding: {source}", title_justify="left", expand=False)
    table.add_column("BatchNorm", style="bold")
    table.add_column("status")
    table.add_column("into / reason", overflow="fold")
    for fold in result.folded:
        arrow = f"{fold.layer.name} ({fold.layer.kind}, BN {fold.position})"
        table.add_row(fold.bn.name, "[green]folded[/green]", arrow)
    for skip in result.skipped:
        table.add_row(skip.bn, "[yellow]skipped[/yellow]", skip.reason)
    if result.folded or result.skipped:
        console.print(table)
    else:
        console.print("No BatchNorm layers found.")
    for note in result.notes:
        console.print(f"Note: {note}", highlight=False, soft_wrap=True)
    if result.was_training:
        console.print("Note: the model was handed over in training mode; it was folded and compared in eval mode",
                      highlight=False, soft_wrap=True)
    for comparison in result.parity:
        for diff in comparison.outputs:
            style = "green" if diff.passed else "red"
            console.print(f"[{style}]{parity_line(comparison, diff)}[/{style}]", highlight=False, soft_wrap=True)
    summary = f"{len(result.folded)} folded, {len(result.skipped)} skipped (discovery: {result.discovery})"
    if result.ok:
        console.print(f"[green]PASSED[/green] | {summary}" + (f" | wrote {output}" if output else ""), highlight=False,
                      soft_wrap=True)
    else:
        console.print(f"[red]FAILED[/red] | {summary} | parity outside tolerance, nothing written", highlight=False,
                      soft_wrap=True)


def fuse_document(result: FuseResult, **context: Any) -> dict[str, Any]:
    return {"schema_version": SCHEMA_VERSION, "command": "fuse", **context, **result.to_dict()}


def write_json(path: Path, document: dict[str, Any]) -> None:
    text = json.dumps(_finite(document), indent=2, default=str, allow_nan=False)
    write_atomic(path, lambda p: Path(p).write_text(text + "\n"))


def _finite(value: Any) -> Any:
    """JSON has no inf/nan: write them as the strings "inf", "-inf", "nan"."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value
