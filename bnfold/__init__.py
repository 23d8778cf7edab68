"""bnfold: make BatchNorm safe to ship.

Public API::

    found = bnfold.plan(model, example_inputs)     # -> Discovery (.folds, .skips): the rules, nothing changed
    result = bnfold.fuse(model, example_inputs)   # -> FuseResult (.model, .folded, .skipped, .parity)
    result = bnfold.export(model, example_inputs, "model.onnx")  # -> ExportResult: a folded, proven ONNX file
    folded = bnfold.fold_graph(onnx_model)        # -> the ONNX graph rewrite alone (.model, .folded, .skipped)
    report = bnfold.verify(model, example_inputs)  # -> Report (truthy when deployable; .findings)
    result = bnfold.recalibrate(model, batches)    # -> RecalibrationResult (.model, .layers)
    table = bnfold.inspect(model, example_inputs)  # -> InspectReport (.rows, .summary): every BN at a glance

``model`` is an nn.Module, a TorchScript module, a torch.export program or (plan, fuse) an onnx.ModelProto.

The names are imported on first use: ``import bnfold`` does not import torch, so the command line can install
its Ctrl-C handling before the slow imports start.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: Public name -> the module that defines it (one table: __all__, the lazy imports and the type hints agree).
_PUBLIC = {
    "Comparison": "bnfold.compare", "OutputDiff": "bnfold.compare", "compare": "bnfold.compare",
    "Discovery": "bnfold.discover.graph", "Fold": "bnfold.discover.graph", "Skip": "bnfold.discover.graph",
    "BnfoldError": "bnfold.errors", "ExportResult": "bnfold.export", "export": "bnfold.export",
    "CODES": "bnfold.findings", "Finding": "bnfold.findings", "FuseResult": "bnfold.fold.result", "fuse": "bnfold.fuse",
    "plan": "bnfold.fuse", "InputSpec": "bnfold.inputs", "InspectReport": "bnfold.inspect",
    "inspect": "bnfold.inspect", "fold_graph": "bnfold.onnx.fold", "RecalibrationResult": "bnfold.recalibrate",
    "recalibrate": "bnfold.recalibrate", "Report": "bnfold.verify", "verify": "bnfold.verify",
}
__all__ = ["CODES", "BnfoldError", "Comparison", "Discovery", "ExportResult", "Finding", "Fold", "FuseResult",
           "InputSpec", "InspectReport", "OutputDiff", "RecalibrationResult", "Report", "Skip", "compare", "export",
           "fold_graph", "fuse", "inspect", "plan", "recalibrate", "verify"]
assert set(__all__) == set(_PUBLIC), "the public names and their modules are one list"


class _Package(types.ModuleType):
    """The package module: public names load on first use, and importing a submodule of the same name
    (``bnfold.fuse``, ``bnfold.export``...) never replaces the public function with the module."""

    def __getattr__(self, name: str) -> Any:
        if name in _PUBLIC:
            value = getattr(importlib.import_module(_PUBLIC[name]), name)
            types.ModuleType.__setattr__(self, name, value)
            return value
        try:
            return importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError:
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _PUBLIC and isinstance(value, types.ModuleType):
            return  # the import system announcing a submodule: the public name keeps its function
        types.ModuleType.__setattr__(self, name, value)

    def __dir__(self) -> list[str]:
        return sorted(set(super().__dir__()) | set(_PUBLIC))


sys.modules[__name__].__class__ = _Package

if TYPE_CHECKING:  # for type checkers and IDEs: the same names, imported eagerly
    from bnfold.compare import Comparison, OutputDiff, compare
    from bnfold.discover.graph import Discovery, Fold, Skip
    from bnfold.errors import BnfoldError
    from bnfold.export import ExportResult, export
    from bnfold.findings import CODES, Finding
    from bnfold.fold.result import FuseResult
    from bnfold.fuse import fuse, plan
    from bnfold.inputs import InputSpec
    from bnfold.inspect import InspectReport, inspect
    from bnfold.onnx.fold import fold_graph
    from bnfold.recalibrate import RecalibrationResult, recalibrate
    from bnfold.verify import Report, verify
