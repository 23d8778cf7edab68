"""What folding did, for every kind: :class:`FuseResult` (``bnfold.fuse``, ``bnfold fuse``, ONNX graphs included)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from bnfold.compare import Comparison
from bnfold.discover.graph import AffineFold, Fold, Skip


@dataclass
class FuseResult:
    """What ``fuse`` did. Truthy when the folded model matches the unfolded eval model."""

    model: Any  # the folded model, same kind as the input (nn.Module, ExportedProgram, ScriptModule)
    folded: list[Fold]
    skipped: list[Skip]
    parity: list[Comparison]
    discovery: str
    notes: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    was_training: bool = False
    affine: list[AffineFold] = field(default_factory=list)  # ONNX: elementwise tails folded into their layers

    @property
    def ok(self) -> bool:
        return bool(self.parity) and all(c.ok for c in self.parity)

    def __bool__(self) -> bool:
        return self.ok

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "discovery": self.discovery,
            "was_training": self.was_training,
            "folded": [f.to_dict() for f in self.folded],
            "skipped": [s.to_dict() for s in self.skipped],
            "affine": [a.to_dict() for a in self.affine],
            "parity": [c.to_dict() for c in self.parity],
            "notes": list(self.notes),
            "timings": dict(self.timings),
        }
