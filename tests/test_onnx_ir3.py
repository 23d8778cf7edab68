"""IR < 4 graphs (caffe2- and early-exporter files, such as the light models that ship in the onnx wheel) list
every initializer among the graph inputs, as IR 3 required: there the listing says nothing, and onnxruntime reads
them as constants. bnfold folds them, writes IR 4 (which lists only fed inputs), and from IR 4 on still refuses an
initializer listed as an input (a caller can override it)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import bnfold
from bnfold.onnx.fold import discover_graph, fold_graph
from tests.onnx_graphs import build, header

LIGHT = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"
CONV_BN = """g (float[N,2,4,4] x, float[3,2,1,1] w, float[3] s, float[3] b, float[3] m, float[3] v)
              => (float[N,3,4,4] y) {
    z = Conv (x, w)
    y = BatchNormalization (z, s, b, m, v)
}"""


def ort_basic_bns(path: Path, tmp_path: Path) -> int:
    """BatchNormalization nodes onnxruntime's basic level leaves (its optimised graph saved offline)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(tmp_path / f"{path.stem}.ort.onnx")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return sum(n.op_type == "BatchNormalization" for n in onnx.load(options.optimized_model_filepath).graph.node)


@pytest.mark.parametrize(("ir", "folds"), [(3, True), (4, False), (8, False)])
def test_listed_initializers_are_constants_only_before_ir_4(ir, folds):
    model = build(header(9) + CONV_BN, listed=("w", "s", "b", "m", "v"))
    model.ir_version = ir
    plan = discover_graph(model)
    assert bool(plan.folds) is folds
    if not folds:
        assert [s.code for s in plan.skips] == ["not-constant"] and "also listed as a graph input" in plan.skips[0].reason
        return
    before = model.SerializeToString()
    result = bnfold.fuse(model)
    assert model.SerializeToString() == before  # the caller's model is not changed
    assert result.ok and len(result.folded) == 1
    assert result.model.ir_version == 4 and [i.name for i in result.model.graph.input] == ["x"]
    assert any("IR version 3" in note for note in result.notes)
    onnx.checker.check_model(result.model, full_check=True)


@pytest.mark.parametrize("name", ["light_resnet50", "light_inception_v2"])
def test_light_models_from_the_onnx_wheel_fold_at_least_as_far_as_onnxruntime(name, tmp_path):
    """Real IR 3 files (weights as ConstantOfShape of listed shape initializers): every BN bnfold can prove
    folds, with parity in onnxruntime, and no more BNs are left than onnxruntime's basic level leaves."""
    path = LIGHT / f"{name}.onnx"
    model = onnx.load(str(path))
    assert model.ir_version == 3
    result = bnfold.fuse(model)
    assert result.ok, [str(c) for c in result.parity]
    left = sum(n.op_type == "BatchNormalization" for n in result.model.graph.node)
    assert left <= ort_basic_bns(path, tmp_path)
    assert len(result.folded) == sum(n.op_type == "BatchNormalization" for n in model.graph.node) - left
    onnx.checker.check_model(result.model, full_check=True)


def test_folding_an_ir3_graph_in_place_matches_onnxruntime_on_the_original(tmp_path):
    model = build(header(9) + CONV_BN, listed=("w", "s", "b", "m", "v"))
    model.ir_version = 3
    path = tmp_path / "ir3.onnx"
    onnx.save(model, str(path))
    folded = fold_graph(onnx.load(str(path)), copy=False).model
    x = np.random.default_rng(0).normal(size=(2, 2, 4, 4)).astype(np.float32)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    want = ort.InferenceSession(str(path), options).run(None, {"x": x})[0]
    got = ort.InferenceSession(folded.SerializeToString(), options).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
