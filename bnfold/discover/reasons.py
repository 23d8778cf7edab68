"""Why a BatchNorm does not fold: the reason codes. API, defined once here.

Every skip carries a short stable code beside its words: the words say what to do about this BN and name the
layers involved (they may be reworded), the code names the cause and does not change between releases. Code
branches on the code, never on the words; ``bnfold inspect`` counts left BNs by it (its JSON's ``summary.left``),
and a skip's JSON object carries it (:meth:`bnfold.discover.nodes.Skip.to_dict`).

A rule that cannot fold returns a :class:`Reason`; a conv/linear (or BN) that cannot take part in any fold holds one
as its :attr:`~bnfold.discover.nodes.Node.refusal`, and a BN that follows or feeds it is skipped with the same code.
"""

from __future__ import annotations

from dataclasses import dataclass

#: Every reason code, with what it means. The order is the order of the docs; codes are never renamed.
CODES: dict[str, str] = {
    # the shared pairing rules (torch and ONNX)
    "not-adjacent": "no conv/linear (or Concat/Add of them) directly feeds it, and it feeds none it can fold into",
    "shared-output": "the output it would fold into is also read elsewhere (another node, or the model output): "
                     "folding would change what those see",
    "bn-reused": "the BN runs more than once per forward: one set of statistics cannot fold into several producers",
    "layer-reused": "the conv/linear it would fold into runs more than once per forward (shared weights)",
    "batch-statistics": "it normalises with batch statistics in eval (track_running_stats=False, no running "
                        "statistics, training=True): there are no fixed statistics to fold",
    "not-constant": "a parameter of the BN or of the layer is not a stored constant (computed in forward or by a "
                    "node, fed at run time, undefined)",
    "padding": "it feeds a padded conv: the padded zeros are not normalised, so folding would not be exact",
    "activation": "the BN module applies an activation after normalising: it cannot fold forward",
    "linear-rank": "the BN's axis 1 is not the Linear's feature axis (an input or output of rank other than 2)",
    "not-a-layer": "what it would fold into is not a conv/linear applied to the data (a Concat/Add operand that is "
                   "no layer's output, a MatMul whose constant is its first operand)",
    "concat-axis": "it follows a Concat along an axis other than the channel axis",
    "broadcast": "an operand of the Add it follows is broadcast across axes or channels",
    "channel-mismatch": "the channels of the Concat's operands do not add up to the BN's",
    "unknown-shape": "bnfold cannot tell a shape it needs (a layer's channel count, an input's rank)",
    "unmergeable-branch": "it is on a branch of an Add that looks like a re-parameterisable block but cannot merge "
                          "into one conv (the words say which condition fails)",
    "structure-kept": "merging its branches into one conv would remove it, but the model keeps its architecture "
                      "(--keep-structure, a state dict for the same class)",
    "input-dependent": "observed forward passes pair it with different layers on different inputs",
    "plain-arithmetic": "a compiled graph computes its normalisation with plain arithmetic, not a batch-norm op",
    # what only an ONNX graph has
    "training-mode": "ONNX BatchNormalization with training_mode=1 or running-statistics outputs: batch statistics "
                     "at inference (BN009)",
    "spatial": "ONNX BatchNormalization with spatial=0: statistics per (channel, position)",
    "not-float": "a parameter's element type is not float, float16, bfloat16 or double",
    "dtype-mismatch": "a constant after a layer has another element type than the layer (an ill-typed ONNX graph)",
    "weight-shape": "the weight of a MatMul/Gemm is not a 2-D constant",
    "transposed-input": "it feeds a Gemm with transA=1: its channels are the Gemm's output rows, not its features",
    "subgraph": "it is inside an ONNX subgraph (If, Loop, Scan); bnfold folds the main graph only",
    # after the plan: applying it and checking it
    "refused": "the tensors refuse the fold the plan proposed (a layout, dtype or graph the host cannot rewrite)",
    "reverted": "the fold changed the outputs and was taken back (observed discovery checks every fold)",
    "not-requested": "foldable, but left as asked (--no-fold)",
    "unclassified": "left without a coded reason: a skip made outside the rules (the words say why)",
}


@dataclass(frozen=True)
class Reason:
    """Why something does not fold: a :data:`CODES` code beside the ``text`` a user reads."""

    code: str
    text: str

    def __post_init__(self) -> None:
        assert self.code in CODES, f"unregistered reason code {self.code!r}"
