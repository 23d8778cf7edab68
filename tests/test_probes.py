"""The audit's probes compare two runs of one model through :mod:`bnfold.compare`: a NaN (or Inf) in one run
only is a change, never "no change"; the same NaN in both runs is no change (non-finite outputs are BN014's)."""

from __future__ import annotations

import math

import torch
from torch import nn

from bnfold import audit
from bnfold.inputs import InputSpec


class NanAlone(nn.Module):
    """A conv whose output is scaled by (n - 1) / (n - 1), n the batch size: exactly 1 at every batch size but 1,
    0 / 0 = NaN at batch 1. Batch independence (two batches of one size) and the finite-outputs probe (batch 4)
    see nothing; only the batch-1 probe sees the NaN."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = torch.tensor(float(x.shape[0] - 1))
        return self.conv(x) * (n / n)


class NanOnSecondCall(nn.Module):
    """A conv whose output is NaN from its second call on: the same input twice gives finite, then NaN."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.conv(x) * (float("nan") if self.calls > 1 else 1.0)


SPECS = [InputSpec((4, 3, 6, 6))]


def _results(model: nn.Module) -> tuple[dict[str, str], dict[str, audit.ProbeResult]]:
    findings, results = audit.probe(model, SPECS, seed=0)
    return {f.code: f.check for f in findings}, {r.name: r for r in results}


def test_a_nan_at_batch_1_fails_the_batch_1_probe():
    codes, results = _results(NanAlone().eval())
    assert results["finite outputs"].passed and results["batch independence"].passed
    assert not results["batch 1"].passed and math.isinf(results["batch 1"].figures["max_rel"])
    assert codes.get("BN002") == "batch 1"


def test_a_nan_in_one_of_two_identical_runs_fails_determinism():
    codes, results = _results(NanOnSecondCall().eval())
    assert not results["determinism"].passed and math.isinf(results["determinism"].figures["max_rel"])
    assert "BN007" in codes


class NanAlways(nn.Module):
    """A conv whose output is NaN on every input: non-finite, but the same in every run."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) * float("nan")


def test_a_model_that_is_nan_everywhere_is_non_finite_not_batch_dependent_or_random():
    codes, results = _results(NanAlways().eval())
    assert not results["finite outputs"].passed and "BN014" in codes
    assert results["batch independence"].passed and results["batch 1"].passed and results["determinism"].passed
    assert "BN002" not in codes and "BN007" not in codes
