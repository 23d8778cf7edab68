"""Dimensions as ONNX producers write them (issue 15): ``dim_value`` -1 or 0 and ``dim_param`` of any spelling
are dynamic; ``--input-shape`` fills them; a fixed dimension the user contradicts stays an error."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from tests.cli_helpers import assert_clean_error, cli

C, H, W = 3, 6, 5


def conv_bn(dims: list) -> onnx.ModelProto:
    """Conv -> BatchNormalization on an input whose dims are written as given: an int is a dim_value, a str a
    dim_param, None a dimension with neither (the way paddle2onnx and early exporters write dynamic axes)."""
    rng = np.random.default_rng(0)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, None)
    for dim in dims:
        d = x.type.tensor_type.shape.dim.add()
        if isinstance(dim, int):
            d.dim_value = dim
        elif isinstance(dim, str):
            d.dim_param = dim
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 4, None, None])
    inits = [numpy_helper.from_array(a.astype(np.float32), n) for n, a in [
        ("w", rng.normal(size=(4, C, 3, 3)) * 0.3), ("s", rng.uniform(0.5, 1.5, 4)), ("b", rng.normal(size=4)),
        ("m", rng.normal(size=4) * 0.1), ("v", rng.uniform(0.5, 2.0, 4))]]
    nodes = [helper.make_node("Conv", ["x", "w"], ["z"], pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["z", "s", "b", "m", "v"], ["y"])]
    graph = helper.make_graph(nodes, "g", [x], [y], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)], ir_version=8)


def fuse(tmp_path, dims: list, *args: str):
    path = tmp_path / "in.onnx"
    onnx.save(conv_bn(dims), str(path))
    out = tmp_path / "out.onnx"
    return path, out, cli("fuse", path, "-o", out, *args)


def assert_folded_matches(path, out, shape) -> None:
    """The written graph has no BN left, and in onnxruntime (no optimiser) computes what the input graph computes
    in onnx's reference evaluator (which, unlike onnxruntime, runs a dim_value 0 input at any size)."""
    assert not [n for n in onnx.load(str(out)).graph.node if n.op_type == "BatchNormalization"]
    x = np.random.default_rng(1).normal(size=shape).astype(np.float32)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    want = ReferenceEvaluator(str(path)).run(None, {"x": x})[0]
    got = ort.InferenceSession(str(out), options).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(np.abs(want).max()))


@pytest.mark.parametrize("batch", [-1, 0, "?", "batch", "p2o.DynamicDimension.0", "", None],
                         ids=["minus-1", "zero", "question", "batch", "paddle", "empty-param", "unset"])
def test_a_dynamic_batch_in_any_spelling_needs_no_input_shape(tmp_path, batch):
    path, out, result = fuse(tmp_path, [batch, C, H, W])
    assert result.exit_code == 0, result.output
    assert "batch 1" in result.output  # checked at 1 and at another size: the batch is dynamic
    assert_folded_matches(path, out, (2, C, H, W))


@pytest.mark.parametrize("batch", [-1, 0, "p2o.DynamicDimension.0", None], ids=["minus-1", "zero", "paddle", "unset"])
def test_input_shape_fills_a_dynamic_batch(tmp_path, batch):
    """The PaddleOCR classifier's spelling: `dimension 0 is fixed at -1, --input-shape 4,3,48,192 says 4` before."""
    path, out, result = fuse(tmp_path, [batch, C, H, W], "--input-shape", f"4,{C},{H},{W}")
    assert result.exit_code == 0, result.output
    assert_folded_matches(path, out, (4, C, H, W))


@pytest.mark.parametrize(("dim", "said"), [(-1, "dim_value -1"), (0, "dim_value 0"), ("h", "'h'"),
                                           ("p2o.DynamicDimension.1", "'p2o.DynamicDimension.1'"), (None, "no size")])
def test_another_dynamic_dimension_is_named_with_what_the_file_says(tmp_path, dim, said):
    _, out, result = fuse(tmp_path, [1, C, dim, W])
    assert_clean_error(result, "ONNX input 'x'", "symbolic dimension 2", f"({said})", "--input-shape")
    assert not out.exists()
    path, out, result = fuse(tmp_path, [1, C, dim, W], "--input-shape", f"1,{C},{H},{W}")
    assert result.exit_code == 0, result.output
    assert_folded_matches(path, out, (1, C, H, W))


def test_a_fixed_dimension_the_user_contradicts_stays_an_error(tmp_path):
    _, out, result = fuse(tmp_path, [-1, C, H, W], "--input-shape", f"2,{C},{H + 1},{W}")
    assert_clean_error(result, "ONNX input 'x' dimension 2 is fixed at 6", f"says {H + 1}")
    assert not out.exists()


def test_a_zero_dimension_is_written_as_a_dim_param_that_onnxruntime_reads_as_dynamic(tmp_path):
    path, out, result = fuse(tmp_path, [0, C, H, W])
    assert result.exit_code == 0, result.output
    assert "written as dim_params" in result.output
    dims = onnx.load(str(out)).graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param == "x_dim0" and [d.dim_value for d in dims[1:]] == [C, H, W]
    assert onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim[0].dim_value == 0  # input untouched
