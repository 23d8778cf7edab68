"""bnfold: make BatchNorm safe to ship.

Public API::

    result = bnfold.fuse(model, example_inputs)   # -> FuseResult (.model, .folded, .skipped, .parity)
    report = bnfold.verify(model, example_inputs)  # -> Report (truthy when deployable; .findings)
    result = bnfold.recalibrate(model, batches)    # -> RecalibrationResult (.model, .layers)
"""

from bnfold.compare import Comparison, OutputDiff, compare
from bnfold.discover.graph import Fold, Skip
from bnfold.errors import BnfoldError
from bnfold.findings import CODES, Finding
from bnfold.fuse import FuseResult, fuse
from bnfold.inputs import InputSpec
from bnfold.recalibrate import RecalibrationResult, recalibrate
from bnfold.verify import Report, verify

__version__ = "0.1.0"

__all__ = ["CODES", "BnfoldError", "Comparison", "Finding", "Fold", "FuseResult", "InputSpec", "OutputDiff",
           "RecalibrationResult", "Report", "Skip", "compare", "fuse", "recalibrate", "verify"]
