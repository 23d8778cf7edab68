"""Finding codes: API. Defined once here, documented in the README, tested one by one."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

Severity = Literal["error", "warning"]


@dataclass(frozen=True)
class Code:
    code: str
    severity: Severity
    title: str
    hint: str


CODES: dict[str, Code] = {c.code: c for c in [
    Code("BN001", "error", "module still in training mode at inference after model.eval()",
         "remove the train()/eval() override or the code in forward() that sets .training, and call F.batch_norm/"
         "F.dropout with training=self.training"),
    Code("BN002", "error", "batch-dependent output in eval: a sample's output changes with its batch companions",
         "the named module uses batch statistics at inference; use running statistics (eval mode, "
         "track_running_stats=True)"),
    Code("BN003", "error", "BatchNorm with track_running_stats=False normalises with batch statistics at inference",
         "train with track_running_stats=True, or re-estimate statistics and set them (bnfold recalibrate)"),
    Code("BN004", "error", "running statistics never learned or not loaded (mean 0, var 1, num_batches_tracked 0)",
         "load the trained checkpoint's buffers (they are in state_dict(), not parameters())"),
    Code("BN005", "error", "NaN/Inf in running statistics or affine parameters",
         "the statistics are broken (diverged training or a bad conversion): re-estimate them"),
    Code("BN006", "warning", "degenerate running variance: folding magnifies weights by more than 1e3",
         "a dead or constant channel: folded weights may overflow fp16 or widen int8 ranges; consider pruning it"),
    Code("BN007", "error", "nondeterministic eval output: dropout or another stochastic layer is active",
         "call dropout through a module (nn.Dropout) or pass training=self.training to F.dropout"),
    Code("BN008", "error", "the folded model's outputs differ from the unfolded eval model's beyond tolerance",
         "see the parity figures; a custom layer may share a BN's input or output"),
    Code("BN009", "error", "the ONNX graph has BatchNormalization with training_mode=1, or Dropout in training mode",
         "export the model in eval mode (model.eval() before torch.onnx.export)"),
    Code("BN010", "error", "ONNX Runtime output differs from the PyTorch eval output beyond tolerance",
         "the exported graph does not compute what the eval model does; re-export from the eval model"),
    Code("BN011", "warning", "BatchNormalization left in the ONNX graph where it could be folded",
         "fold it before export (bnfold fuse) so every runtime gets the folded graph"),
    Code("BN012", "warning", "the model was saved or handed over in training mode",
         "call model.eval() before saving or exporting; bnfold verified it as deployed, in eval mode"),
    Code("BN013", "warning", "stale running statistics: far from the population statistics of the given data",
         "re-estimate them on representative data: bnfold recalibrate MODEL --data ..."),
    Code("BN014", "error", "the eval model's output is NaN or infinite on finite inputs",
         "the named module is the first whose output is not finite: check its weights and BN statistics (an inf "
         "weight, running_var 0 with eps 0)"),
]}


@dataclass(frozen=True)
class CheckDef:
    """One check of ``bnfold verify``: a JUnit test case and a line of the report, with the codes it can file."""

    name: str
    group: str  # the --skip group that runs it: audit, fold, onnx (or "load" for what loading finds)
    codes: tuple[str, ...]


#: Every check, in report order. The code -> check and check -> codes maps below are derived from it.
CHECKS: tuple[CheckDef, ...] = (
    CheckDef("handover", "load", ("BN012",)),
    CheckDef("statistics", "audit", ("BN003", "BN004", "BN005", "BN006")),
    CheckDef("mode", "audit", ("BN001",)),
    CheckDef("batch independence", "audit", ("BN002",)),
    CheckDef("batch 1", "audit", ("BN002",)),
    CheckDef("determinism", "audit", ("BN007",)),
    CheckDef("finite outputs", "audit", ("BN014",)),
    CheckDef("statistics vs data", "audit", ("BN013",)),
    CheckDef("fold parity", "fold", ("BN008",)),
    CheckDef("onnx lint", "onnx", ("BN009", "BN011")),
    CheckDef("onnx parity", "onnx", ("BN010",)),
    CheckDef("onnx determinism", "onnx", ("BN007",)),
)
CHECK_GROUPS = ("audit", "fold", "onnx")

#: Findings of the exported graph that follow from an error the eval model already shows in PyTorch: the graph
#: computes what the eval model computes, its randomness and batch statistics included. Keyed by the check that
#: files the consequence (and, for the lint, the ONNX op of the node it names); the value is the checks whose
#: error explains it, most specific first. ``bnfold verify`` links each consequence to the first cause found
#: (:attr:`Finding.caused_by`), so that a user fixes one thing.
CAUSES: dict[tuple[str, str | None], tuple[str, ...]] = {
    ("onnx determinism", None): ("determinism",),
    ("onnx lint", "Dropout"): ("determinism",),
    ("onnx lint", "BatchNormalization"): ("mode", "batch independence", "batch 1"),
    ("onnx parity", None): ("determinism", "mode", "batch independence", "batch 1"),
}
#: The codes that can make each check fail (a check failing only through disabled codes passes).
CODES_OF_CHECK: dict[str, tuple[str, ...]] = {c.name: c.codes for c in CHECKS}
#: The check a code is filed under unless its finding names another (the first check that lists it).
CHECK_OF_CODE: dict[str, str] = {}
for _check in CHECKS:
    for _code in _check.codes:
        CHECK_OF_CODE.setdefault(_code, _check.name)
assert set(CHECK_OF_CODE) == set(CODES), "every code belongs to a check, and every check's codes exist"


@dataclass(frozen=True)
class Finding:
    """One problem found. ``module`` is a dotted module name, an ONNX node name, or "" for the whole model.

    ``check`` is the check that filed it, when its code belongs to several (BN002: batch independence or
    batch 1; BN007: determinism of PyTorch or of onnxruntime).
    """

    code: str
    module: str
    message: str
    advice: str | None = None  # a hint for this case, when the code's general hint does not fit
    check: str | None = None
    caused_by: str | None = None  # the finding this one follows from (``"BN007 in head"``): fix that one first

    def __post_init__(self) -> None:
        if self.code not in CODES:
            raise ValueError(f"unknown finding code {self.code!r}")
        if self.check is not None and self.code not in CODES_OF_CHECK.get(self.check, ()):
            raise ValueError(f"{self.code} is not a code of the check {self.check!r}")

    @property
    def severity(self) -> Severity:
        return CODES[self.code].severity

    @property
    def hint(self) -> str:
        return self.advice or CODES[self.code].hint

    @property
    def check_name(self) -> str:
        return self.check or CHECK_OF_CODE[self.code]

    @property
    def detail(self) -> str:
        """The message, and the finding it follows from when there is one: what every report prints."""
        return f"{self.message}; caused by {self.caused_by}" if self.caused_by else self.message

    def because_of(self, cause: Finding) -> Finding:
        """This finding, linked to the finding it follows from."""
        return dataclasses.replace(self, caused_by=f"{cause.code} in {cause.module or 'the model'}")

    def to_dict(self) -> dict[str, Any]:
        return {"code": self.code, "severity": self.severity, "check": self.check_name, "module": self.module,
                "message": self.message, "hint": self.hint, "caused_by": self.caused_by}

    def __str__(self) -> str:
        where = f"{self.module}: " if self.module else ""
        return f"{self.code} {self.severity} {where}{self.detail}"


def code_range() -> str:
    """``BN001-BN014``: for help texts, so they never go stale."""
    codes = sorted(CODES)
    return f"{codes[0]}-{codes[-1]}"
