"""The producer corpus (``models/onnx_corpus.py``, issue 15 item 7): every graph spells BatchNorm as its producer
does, passes ``onnx.checker``'s full check and runs in onnxruntime; bnfold folds it with parity, checked by
``bnfold.fuse`` and, independently, by running ``fold_graph``'s output against the input in onnxruntime
(optimisations off); and :data:`LEFT` ratchets what bnfold leaves."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

import bnfold
from bnfold.onnx.fold import fold_graph
from models.onnx_corpus import CORPUS, Left, example_feeds, left, parity, run_plain
from tests.onnx_graphs import build

# What bnfold's fold_graph leaves in each graph: (BatchNormalization nodes, affine chains), counted by
# models.onnx_corpus.left. A ratchet: the test asserts "<=", so bnfold may only get better here (it leaves nothing
# in any graph of the corpus; scripts/bench_onnx_corpus.py prints the current counts).
LEFT = {name: Left(bn=0, affine=0) for name in CORPUS}

#: What each input graph holds (BN nodes, affine chains): the spelling the corpus promises, as left() sees it.
SPELLED = {
    "paddle2onnx": Left(bn=2, affine=0),
    "tf2onnx_nhwc": Left(bn=1, affine=1),
    "torch_opset9": Left(bn=3, affine=0),
    "frozen_bn_mul_add": Left(bn=0, affine=2),
    "ort_basic_output": Left(bn=2, affine=0),  # onnxruntime folded the Conv+BN; left the Concat and Gemm BNs
    "dynamo_unoptimized": Left(bn=3, affine=0),
    "old_opset7_spatial": Left(bn=2, affine=0),
    "old_ir3_opset9": Left(bn=2, affine=0),
    "constant_value_floats": Left(bn=1, affine=1),
}


def _ops(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


def _dims(model: onnx.ModelProto) -> list[str]:
    return [str(d.dim_param or d.dim_value) for i in model.graph.input for d in i.type.tensor_type.shape.dim[:1]]


def _attrs(model: onnx.ModelProto, op_type: str) -> set[str]:
    return {a.name for n in model.graph.node if n.op_type == op_type for a in n.attribute}


def _listed(model: onnx.ModelProto) -> bool:
    initializers = {t.name for t in model.graph.initializer}
    return bool(initializers) and initializers <= {i.name for i in model.graph.input}


#: The peculiarity of each producer's spelling, as a check on the built graph.
PECULIAR = {
    "paddle2onnx": lambda m: (not m.graph.initializer and "Constant" in _ops(m) and "ConvTranspose" in _ops(m)
                              and _dims(m) == ["-1", "p2o.DynamicDimension.0"]),
    "tf2onnx_nhwc": lambda m: _ops(m).count("Transpose") == 6 and m.graph.input[0].name == "input_1:0",
    "torch_opset9": lambda m: m.opset_import[0].version == 9 and "Gemm" in _ops(m),
    "frozen_bn_mul_add": lambda m: {"Mul", "Add", "Sub", "Div", "Sqrt"} <= set(_ops(m)),
    "ort_basic_output": lambda m: any(i.name.startswith("ConvBnFusion") for i in m.graph.initializer),
    "dynamo_unoptimized": lambda m: "Expand" in _ops(m) and m.opset_import[0].version >= 18,
    "old_opset7_spatial": lambda m: (m.opset_import[0].version == 7 and _listed(m)
                                     and "spatial" in _attrs(m, "BatchNormalization")),
    "old_ir3_opset9": lambda m: m.ir_version == 3 and m.opset_import[0].version == 9 and _listed(m),
    "constant_value_floats": lambda m: {"value_float", "value_floats"} <= _attrs(m, "Constant"),
}


@pytest.fixture(scope="module", params=list(CORPUS))
def entry(request) -> tuple[str, onnx.ModelProto]:
    """Each graph built once for this file (the dynamo export takes seconds; models.onnx_corpus caches it too)."""
    return request.param, CORPUS[request.param]()


def test_the_tables_cover_the_corpus():
    assert set(LEFT) == set(SPELLED) == set(PECULIAR) == set(CORPUS)


def test_builders_return_fresh_identical_models():
    """A caller may fold a graph in place: each call builds a new proto, with the same seeded weights."""
    first, second = CORPUS["paddle2onnx"](), CORPUS["paddle2onnx"]()
    assert first is not second and first.SerializeToString() == second.SerializeToString()


def test_the_graph_is_valid_and_runs(entry):
    name, model = entry
    onnx.checker.check_model(model, full_check=True)
    assert PECULIAR[name](model), f"{name} lost its producer's spelling"
    assert left(model) == SPELLED[name]
    outputs = run_plain(model, example_feeds(model))
    assert outputs and all(np.isfinite(o).all() and np.abs(o).max() > 0 for o in outputs)


def test_fold_graph_keeps_parity_and_leaves_no_more_than_recorded(entry):
    name, model = entry
    before = model.SerializeToString()
    result = fold_graph(model)
    assert model.SerializeToString() == before  # the input is not modified
    onnx.checker.check_model(result.model, full_check=True)
    feeds = example_feeds(model)
    got = parity(run_plain(model, feeds), run_plain(result.model, feeds))
    assert got, f"{name}: max |folded - original| {got.max_abs:.3g} at output scale {got.scale:.3g}"
    now = left(result.model)
    assert now.bn <= LEFT[name].bn and now.affine <= LEFT[name].affine, f"{name}: bnfold now leaves {now}"
    assert len(result.folded) >= SPELLED[name].bn - now.bn


def test_fuse_proves_parity(entry):
    name, model = entry
    result = bnfold.fuse(model)
    assert result, f"{name}: {[str(c) for c in result.parity]} {result.notes}"
    assert result.parity and all(result.parity)


# The affine-chain heuristic of models.onnx_corpus.left, on one Conv: s, t are (1,4,1,1) constants, c a (4,) one
# (the last axis, for NHWC), f a full (1,4,8,8) tensor.
CHAIN = """<ir_version: 8, opset_import: ["" : 17]>
g (float[N,3,8,8] x, float[4,3,1,1] w, float[1,4,1,1] s, float[1,4,1,1] t, float[4] c, float[1,4,8,8] f)
  => (float[N,4,8,8] y) {{
    z = Conv (x, w)
    {body}
}}"""


@pytest.mark.parametrize(("body", "affine"), [
    ("m = Mul (z, s)\n y = Add (m, t)", 1),  # FrozenBatchNorm2d
    ("m = Mul (s, z)\n y = Sub (m, t)", 1),  # either operand order for Mul; Sub is a shift
    ("a = Sub (z, t)\n d = Div (a, s)\n m = Mul (d, s)\n y = Add (m, t)", 1),  # one chain, counted once
    ("p = Transpose <perm = [0,2,3,1]> (z)\n m = Mul (p, c)\n a = Add (m, c)\n y = Transpose <perm = [0,3,1,2]> (a)",
     1),  # tf2onnx: through Transposes
    ("y = Add (z, t)", 0),  # a bias
    ("y = Mul (z, s)", 0),  # a scale alone
    ("m = Mul (z, f)\n y = Add (m, t)", 0),  # not per channel
    ("a = Sub (t, z)\n y = Mul (a, s)", 0),  # t - z: the layer's tensor second
    ("m = Mul (z, s)\n r = Relu (z)\n a = Add (m, t)\n y = Add (a, r)", 0),  # the conv output read twice
])
def test_left_counts_a_scale_and_a_shift_by_per_channel_constants_after_a_layer(body, affine):
    model = build(CHAIN.format(body=body))
    assert left(model) == Left(bn=0, affine=affine)
