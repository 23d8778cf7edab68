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
"""

from bnfold.compare import Comparison, OutputDiff, compare
from bnfold.discover.graph import Discovery, Fold, Skip
from bnfold.errors import BnfoldError
from bnfold.export import ExportResult, export
from bnfold.findings import CODES, Finding
from bnfold.fuse import FuseResult, fuse, plan
from bnfold.inputs import InputSpec
from bnfold.inspect import InspectReport, inspect
from bnfold.onnx.fold import fold_graph
from bnfold.recalibrate import RecalibrationResult, recalibrate
from bnfold.verify import Report, verify

__version__ = "0.1.0"

__all__ = ["CODES", "BnfoldError", "Comparison", "Discovery", "ExportResult", "Finding", "Fold", "FuseResult",
           "InputSpec", "InspectReport", "OutputDiff", "RecalibrationResult", "Report", "Skip", "compare", "export",
           "fold_graph", "fuse", "inspect", "plan", "recalibrate", "verify"]
