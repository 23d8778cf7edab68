"""``bnfold inspect --plot``: one PNG of an :class:`~bnfold.inspect.InspectReport`, for those who would rather look.

Per BN, in forward order (x axis, one tick per BN), stacked panels sharing that axis:

1. the magnification range ``|gamma| / sqrt(var + eps)`` over channels (log scale), with the risk line at
   :data:`bnfold.audit.DEGENERATE_SCALE`;
2. the running-variance range over channels (log scale), with the float16 maximum when a variance comes near it;
3. with ``--data``: the drift, mean shift in standard deviations and the log of the variance ratio, with BN013's
   thresholds.

Folded BNs are drawn in green, BNs the plan leaves in orange; risky BNs have their name in red. Rendering only:
every number comes from the report. matplotlib is an optional extra (``bnfold[plot]``), imported when a plot is
drawn; the figure is drawn on its own Agg canvas (no display, and pyplot's global backend is left alone).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from bnfold.audit import DEGENERATE_SCALE
from bnfold.errors import BnfoldError
from bnfold.inspect import FP16_MAX
from bnfold.save import write_atomic
from bnfold.verify import STALE_MEAN_SHIFT, STALE_VAR_RATIO

PLOT_HINT = 'pip install "bnfold[plot]"'
_FOLDED, _LEFT, _RISK = "#2e7d32", "#ef6c00", "#c62828"
_FLOOR = 1e-12  # log axes cannot show 0 (a dead channel's magnification, a zero variance)


def new_figure(**options: Any) -> Any:
    """A matplotlib ``Figure`` on an Agg canvas, or a :class:`BnfoldError` naming the extra that installs it."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise BnfoldError("--plot needs matplotlib, which is not installed", PLOT_HINT) from None
    figure = Figure(**options)
    FigureCanvasAgg(figure)
    return figure


def require_matplotlib() -> None:
    """Fail early (before any long computation) when matplotlib is missing."""
    new_figure()


def plot_inspect(report: Any, path: str | Path, *, title: str = "") -> None:
    """Draw ``report`` and write it to ``path`` as PNG (atomically: a failed write leaves the old file)."""
    rows = report.rows
    drift = report.drift is not None
    fig = new_figure(figsize=(max(8.0, 0.32 * len(rows) + 3.0), 8.5 if drift else 6.0))
    axes = fig.subplots(3 if drift else 2, 1, sharex=True)
    x = list(range(len(rows)))
    colours = [_FOLDED if r.folds else _LEFT for r in rows]
    _ranges(axes[0], x, [(r.figures.magnification_min or r.figures.magnification_max, r.figures.magnification_max)
                         if r.figures else None for r in rows], colours)
    for xi, row in zip(x, rows):
        if row.figures and row.figures.dead_channels:
            axes[0].annotate(f"{row.figures.dead_channels} dead", (xi, row.figures.magnification_max), xytext=(0, 6),
                             textcoords="offset points", ha="center", fontsize=7, color="grey")
    axes[0].axhline(DEGENERATE_SCALE, color=_RISK, linestyle="--", linewidth=1)
    axes[0].annotate(f"risk: magnification > {DEGENERATE_SCALE:g}", (0, DEGENERATE_SCALE),
                     xycoords=("axes fraction", "data"), xytext=(4, 3), textcoords="offset points", color=_RISK,
                     fontsize=8)
    axes[0].set_ylabel("|gamma| / sqrt(var + eps)\n(min..max over channels)")
    variances = [(r.figures.var_min, r.figures.var_max) if r.figures else None for r in rows]
    _ranges(axes[1], x, variances, colours)
    if any(v is not None and v[1] > FP16_MAX / 100 for v in variances):
        axes[1].axhline(FP16_MAX, color=_RISK, linestyle="--", linewidth=1)
        axes[1].annotate(f"float16 max {FP16_MAX:g}", (0, FP16_MAX), xycoords=("axes fraction", "data"),
                         xytext=(4, 3), textcoords="offset points", color=_RISK, fontsize=8)
    axes[1].set_ylabel("running var\n(min..max over channels)")
    if drift:
        _drift(axes[2], x, rows)
    _legend(fig)
    last = axes[-1]
    last.set_xticks(x)
    last.set_xticklabels([r.name for r in rows], rotation=90, fontsize=7)
    for label, row in zip(last.get_xticklabels(), rows):
        if row.flags:
            label.set_color(_RISK)
    last.set_xlim(-0.7, len(rows) - 0.3)
    last.set_xlabel("BatchNorm, in forward order (red name: risk flags)")
    fig.suptitle(title or f"BatchNorm inspection ({report.kind})", fontsize=11, x=0.02, ha="left")
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    write_atomic(Path(path), lambda p: fig.savefig(p, format="png", dpi=110))


def _ranges(ax: Any, x: list[int], ranges: list[tuple[float, float] | None], colours: list[str]) -> None:
    """A vertical bar from min to max per BN, a dot at the max; log scale, values clipped to a floor."""
    for xi, bounds, colour in zip(x, ranges, colours):
        if bounds is None or not all(math.isfinite(b) for b in bounds):
            continue
        low, high = (max(b, _FLOOR) for b in bounds)
        ax.vlines(xi, low, high, color=colour, linewidth=4, alpha=0.55)
        ax.plot([xi], [high], marker="o", markersize=4, color=colour)
    ax.set_yscale("log")
    ax.grid(True, axis="y", which="major", alpha=0.3)


def _drift(ax: Any, x: list[int], rows: list[Any]) -> None:
    shifts = [r.drift.mean_shift if r.drift else 0.0 for r in rows]
    ratios = [math.log(r.drift.var_ratio) if r.drift else 0.0 for r in rows]
    ax.bar([xi - 0.2 for xi in x], shifts, width=0.4, color="#1565c0", label="max mean shift (std)")
    ax.bar([xi + 0.2 for xi in x], ratios, width=0.4, color="#8e24aa", label="ln(max var ratio)")
    ax.axhline(STALE_MEAN_SHIFT, color="#1565c0", linestyle=":", linewidth=1)
    ax.axhline(math.log(STALE_VAR_RATIO), color="#8e24aa", linestyle=":", linewidth=1)
    for xi, row in zip(x, rows):
        if row.drift is None:
            ax.annotate("n/a", (xi, 0), ha="center", va="bottom", fontsize=6, color="grey")
    ax.set_ylabel("drift from the data\n(dotted: BN013 thresholds)")
    ax.legend(fontsize=8, loc="upper right")
    ax.grid(True, axis="y", alpha=0.3)


def _legend(fig: Any) -> None:
    from matplotlib.lines import Line2D

    fig.legend(handles=[Line2D([], [], color=_FOLDED, linewidth=4, label="folds"),
                        Line2D([], [], color=_LEFT, linewidth=4, label="left (the table says why)")],
               fontsize=8, loc="upper right", ncol=2, frameon=False)
