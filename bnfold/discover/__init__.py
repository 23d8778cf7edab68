"""Find which BatchNorm folds into which layer (and why the others do not)."""

from __future__ import annotations

from typing import Any

from torch import nn

from bnfold.discover import fx, observed
from bnfold.discover.graph import Discovery, Fold, Skip
from bnfold.discover.reasons import CODES, Reason
from bnfold.errors import first_line

__all__ = ["CODES", "Discovery", "Fold", "Reason", "Skip", "discover"]


def discover(model: nn.Module, input_draws: list[tuple[Any, ...]], method: str = "auto", *,
             structural: bool = True) -> Discovery:
    """``method``: ``"fx"`` (static), ``"observed"`` (forward passes), ``"auto"`` (fx, else observed).

    ``structural``: apply the rules that change the graph (branch merging); off for hosts that keep the structure.

    ``input_draws`` are example inputs; fx uses the first for shapes, observation runs them all (inputs that
    take other branches show more of the model).
    """
    if method == "observed":
        return observed.discover(model, input_draws)
    try:
        return fx.discover(model, input_draws[0], structural=structural)
    except Exception as exc:  # torch.fx raises many kinds of errors on untraceable code
        if method == "fx":
            raise
        found = observed.discover(model, input_draws)
        found.notes.append(f"torch.fx cannot trace the model ({type(exc).__name__}: {first_line(exc, 160)}); BNs were "
                           "found by observing a forward pass and every fold was checked numerically")
        return found
