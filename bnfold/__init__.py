"""bnfold: make BatchNorm safe to ship.

Public API::

    result = bnfold.fuse(model, example_inputs)   # -> FuseResult (.model, .folded, .skipped, .parity)
"""

from bnfold.compare import Comparison, OutputDiff, compare
from bnfold.discover.graph import Fold, Skip
from bnfold.errors import BnfoldError
from bnfold.fuse import FuseResult, fuse
from bnfold.inputs import InputSpec

__version__ = "0.1.0"

__all__ = ["BnfoldError", "Comparison", "Fold", "FuseResult", "InputSpec", "OutputDiff", "Skip", "compare", "fuse"]
