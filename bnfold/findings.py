"""Finding codes: API. Defined once here, documented in the README, tested one by one."""

from __future__ import annotations

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
]}


@dataclass(frozen=True)
class Finding:
    """One problem found. ``module`` is a dotted module name, an ONNX node name, or "" for the whole model."""

    code: str
    module: str
    message: str

    @property
    def severity(self) -> Severity:
        return CODES[self.code].severity

    @property
    def hint(self) -> str:
        return CODES[self.code].hint

    def to_dict(self) -> dict[str, Any]:
        return {"code": self.code, "severity": self.severity, "module": self.module, "message": self.message,
                "hint": self.hint}

    def __str__(self) -> str:
        where = f"{self.module}: " if self.module else ""
        return f"{self.code} {self.severity} {where}{self.message}"


#: The check each code belongs to (JUnit test cases and the terminal table group findings by it).
CHECK_OF_CODE = {
    "BN001": "mode", "BN002": "batch independence", "BN003": "statistics", "BN004": "statistics",
    "BN005": "statistics", "BN006": "statistics", "BN007": "determinism", "BN008": "fold parity",
    "BN009": "onnx parity", "BN010": "onnx parity", "BN011": "onnx parity", "BN012": "handover",
    "BN013": "statistics vs data",
}

#: The codes that can make each check fail (a check failing only through disabled codes passes).
CODES_OF_CHECK: dict[str, tuple[str, ...]] = {
    "statistics": ("BN003", "BN004", "BN005", "BN006"), "mode": ("BN001",), "batch independence": ("BN002",),
    "batch 1": ("BN002",), "determinism": ("BN007",), "fold parity": ("BN008",),
    "onnx parity": ("BN009", "BN010", "BN011"), "statistics vs data": ("BN013",),
    "onnx lint": ("BN009", "BN011"), "onnx determinism": ("BN007",),
}
