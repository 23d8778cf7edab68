"""ONNX graphs are indexed and labelled once (:class:`bnfold.onnx.graph.GraphIndex`, :func:`node_labels`).

* Export's safety net (``_unpaired_bns``) names BNs as the plan does, so two BatchNormalization nodes that share
  a name are never listed as "left in the graph" next to their fold or skip.
* A constant weight chain whose intermediate tensor a subgraph reads is left computed (dropping it would leave
  the subgraph reading a name nothing defines).
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx_graphs import build, header

from bnfold.export import _unpaired_bns
from bnfold.onnx.fold import discover_graph, fold_graph

# -- one labelling: export's list of BNs left in the graph ---------------------------------------------------------
# Conv -> BN, then a second BN: after a Relu (skipped: nothing to fold into) or after its own Conv (folds too).
AFTER_RELU = header() + """g (float[N,2,4,4] x, float[3,2,1,1] w, float[3] s, float[3] b, float[3] m, float[3] v,
                               float[3] s2, float[3] b2, float[3] m2, float[3] v2) => (float[N,3,4,4] y) {
    z = Conv (x, w)
    t = BatchNormalization (z, s, b, m, v)
    r = Relu (t)
    y = BatchNormalization (r, s2, b2, m2, v2)
}"""
AFTER_CONV = header() + """g (float[N,2,4,4] x, float[3,2,1,1] w, float[3] s, float[3] b, float[3] m, float[3] v,
                               float[3,3,1,1] w2, float[3] s2, float[3] b2, float[3] m2, float[3] v2)
                               => (float[N,3,4,4] y) {
    z = Conv (x, w)
    t = BatchNormalization (z, s, b, m, v)
    z2 = Conv (t, w2)
    y = BatchNormalization (z2, s2, b2, m2, v2)
}"""


@pytest.mark.parametrize(("text", "folds", "skips"), [(AFTER_RELU, 1, 1), (AFTER_CONV, 2, 0)],
                         ids=["one-skipped", "both-foldable"])
def test_two_bns_sharing_a_name_are_not_listed_as_left_in_the_graph(text, folds, skips):
    model = build(text)
    for node in model.graph.node:
        if node.op_type == "BatchNormalization":
            node.name = "bn"  # valid ONNX: node names need not be unique
    plan = discover_graph(model)
    assert (len(plan.folds), len(plan.skips)) == (folds, skips), (plan.folds, plan.skips)
    assert {f.bn.name for f in plan.folds} | {s.bn for s in plan.skips} == {"bn@1", "bn@3"}
    assert _unpaired_bns(model, plan) == []


# -- one index: reads inside subgraphs count for the constant-weight chains ----------------------------------------
def _weight_chain_read_by_a_subgraph(read: str) -> onnx.ModelProto:
    """Conv weight ``w2 = Neg(Identity(w))``, computed from constants alone; an If branch reads ``read`` and
    ``c``, an initializer nothing else reads."""
    rng = np.random.default_rng(0)
    branch = helper.make_graph([helper.make_node("Add", [read, "c"], ["k"], name="keep")], "then", [],
                               [helper.make_tensor_value_info("k", TensorProto.FLOAT, [3, 2, 1, 1])])
    nodes = [
        helper.make_node("Identity", ["w"], ["w1"], name="id"),
        helper.make_node("Neg", ["w1"], ["w2"], name="neg"),
        helper.make_node("Conv", ["x", "w2"], ["z"], name="conv"),
        helper.make_node("BatchNormalization", ["z", "s", "b", "m", "v"], ["y"], name="bn"),
        helper.make_node("If", ["flag"], ["out"], name="if", then_branch=branch, else_branch=branch),
    ]
    values = {"w": rng.normal(size=(3, 2, 1, 1)), "s": rng.uniform(0.5, 1.5, 3), "b": rng.normal(size=3),
              "m": rng.normal(size=3), "v": rng.uniform(0.5, 1.5, 3), "c": rng.normal(size=1)}
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, 4, 4]),
         helper.make_tensor_value_info("flag", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3, 4, 4]),
         helper.make_tensor_value_info("out", TensorProto.FLOAT, [3, 2, 1, 1])],
        [numpy_helper.from_array(np.asarray(v, dtype=np.float32), k) for k, v in values.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize(("read", "evaluated"), [("w1", False), ("w2", True)], ids=["intermediate", "weight"])
def test_a_weight_chain_read_inside_a_subgraph_is_evaluated_only_when_the_read_name_stays(read, evaluated):
    """An intermediate of the chain read by a subgraph: the chain stays (its nodes would be dropped). The weight
    itself read by a subgraph: evaluated as before (the initializer keeps its name). Either way the initializer
    only the subgraph reads stays."""
    result = fold_graph(_weight_chain_read_by_a_subgraph(read))
    assert any("computed from constants alone" in note for note in result.notes) is evaluated, result.notes
    assert [f.bn.name for f in result.folded] == (["bn"] if evaluated else [])  # a computed weight: no fold
    defined = {t.name for t in result.model.graph.initializer} | {i.name for i in result.model.graph.input}
    defined |= {name for node in result.model.graph.node for name in node.output}
    assert {read, "c"} <= defined, f"the If branch reads {read} and c: something must still define them"
    onnx.checker.check_model(result.model, full_check=True)
