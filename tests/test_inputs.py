"""Model inputs: --input-shape specs (shapes, dtypes, value ranges) and the inputs drawn from them, the shape a
model needs but was not given, and ONNX graphs whose inputs bnfold cannot draw (none, a scalar, an unknown element
type, a huge declared size, a shape that disagrees with the graph).

Expected values are computed by hand or with numpy/torch directly, never with the code under test.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnx.parser
import pytest
import torch
from onnx import helper
from torch import nn

import bnfold
from bnfold.errors import InputSpecError
from bnfold.inputs import InputSpec, make_inputs, parse_input_spec, specs_from_tensors
from tests.cli_helpers import assert_clean_error, cli, run
from tests.onnx_graphs import graph, save
from tests.processes import POSIX, bnfold_child


# -- shapes --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text", ["1,3,224,224", "1x3x224x224", "1X3X224X224", " 1, 3, 224, 224 "])
def test_shape_separators(text):
    assert parse_input_spec(text) == InputSpec((1, 3, 224, 224), torch.float32)


@pytest.mark.parametrize(("text", "named"), [
    ("1,,3", "dimension 2 is empty"),
    ("1,3,", "dimension 3 is empty"),
    ("1,3,x", "dimension 3 is 'x'"),
    ("1,3,-2", "dimension 3 is '-2'"),
    ("1.5", "dimension 1 is '1.5'"),
    ("0,3", "dimension 1 is '0'"),
    ("1x3,4", "dimension 1 is '1x3'"),  # one separator throughout
    ("", "dimension 1 is empty"),
])
def test_bad_shapes_name_the_bad_part(text, named):
    with pytest.raises(InputSpecError) as info:
        parse_input_spec(text)
    assert named in info.value.message and repr(text) in info.value.message
    assert "--input-shape" in info.value.hint


# -- value ranges --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("text", "fields"), [
    ("8,128:int64:0..30522", ((8, 128), torch.int64, 0, 30522)),
    ("4:int32:-5..5", ((4,), torch.int32, -5, 5)),
    ("1,3,8,8:float32:0..1", ((1, 3, 8, 8), torch.float32, 0.0, 1.0)),
    ("2:float16:-1.5..2.5", ((2,), torch.float16, -1.5, 2.5)),
    ("2:bf16:1e-3..0.1", ((2,), torch.bfloat16, 1e-3, 0.1)),
    ("2,3:int64", ((2, 3), torch.int64)),
    ("2,3", ((2, 3),)),
])
def test_range_specs_parse_and_round_trip(text, fields):
    spec = parse_input_spec(text)
    assert spec == InputSpec(*fields)
    assert parse_input_spec(str(spec)) == spec


@pytest.mark.parametrize(("text", "reason"), [
    ("8:int64:5..5", "LOW must be < HIGH"),
    ("8:int64:3..1", "LOW must be < HIGH"),
    ("8:int64:0..2.5", "'2.5' in '8:int64:0..2.5' is not an integer"),
    ("8:float32:0..nan", "must be finite"),
    ("8:float32:-inf..0", "must be finite"),
    ("8:bool:0..1", "bool inputs take no range"),       # bool inputs are 0/1 already
    ("8:int64:0-5", "expected LOW..HIGH"),
    ("8:int64:", "expected LOW..HIGH"),
    ("8:int32:0..3000000000", "within -2147483648..2147483648"),
    ("8:float16:1000.1..1000.2", "no float16 value"),   # float16 steps by 0.5 there
    ("8:int64:0..1:extra", "expected SHAPE[:DTYPE[:LOW..HIGH]]"),
])
def test_bad_ranges_are_refused_with_the_reason(text, reason):
    with pytest.raises(InputSpecError) as info:
        parse_input_spec(text)
    assert reason in info.value.message


@pytest.mark.parametrize(("low", "high"), [(0.5, 3), (0, None), (None, 3), (3, 3)])
def test_input_spec_validates_ranges_given_in_python(low, high):
    with pytest.raises(InputSpecError):
        InputSpec((2,), torch.int64, low, high)


def test_draws_without_a_range_are_unchanged():
    """Seeded draws predate ranges: standard normal floats, integers from torch.randint(0, 8)."""
    x, ids = make_inputs([InputSpec((2, 3)), InputSpec((4,), torch.int64)], seed=5)
    generator = torch.Generator().manual_seed(5)
    assert torch.equal(x, torch.randn((2, 3), generator=generator))
    assert torch.equal(ids, torch.randint(0, 8, (4,), generator=generator))


def test_integer_range_is_drawn_like_torch_randint():
    (ids,) = make_inputs([parse_input_spec("64,128:int64:30000..30522")], seed=3)
    expected = torch.randint(30000, 30522, (64, 128), generator=torch.Generator().manual_seed(3))
    assert torch.equal(ids, expected)
    assert ids.min() >= 30000 and ids.max() < 30522


def test_float_range_is_uniform_on_the_half_open_interval():
    (x,) = make_inputs([parse_input_spec("20000:float32:-2..3")], seed=0)
    assert x.dtype == torch.float32
    assert x.min() >= -2.0 and x.max() < 3.0
    # uniform on [-2, 3): mean 0.5, std 5 / sqrt(12); the standard error of the mean is ~0.01
    assert float(x.mean()) == pytest.approx(0.5, abs=0.05)
    assert float(x.std()) == pytest.approx(5 / math.sqrt(12), rel=0.03)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_narrow_float_draws_stay_below_high(dtype):
    # 0.9999 rounds to 1.0 in these dtypes; with 10^5 draws some would without a clamp
    (x,) = make_inputs([parse_input_spec(f"100000:{dtype}:0..1")], seed=0)
    assert x.dtype == getattr(torch, dtype)
    assert float(x.min()) >= 0.0 and float(x.max()) < 1.0


def test_batch_override_keeps_the_range():
    (ids,) = make_inputs([parse_input_spec("8,16:int64:100..104")], seed=1, batch=3)
    assert ids.shape == (3, 16)
    assert set(ids.unique().tolist()) == {100, 101, 102, 103}


def test_specs_from_tensors_keep_the_integer_range():
    ids = torch.tensor([[3, 7], [5, 4]])
    specs = specs_from_tensors((ids, torch.randn(2, 5), torch.tensor([True, False])))
    assert specs == [InputSpec((2, 2), torch.int64, 3, 8),  # [min, max + 1)
                     InputSpec((2, 5), torch.float32), InputSpec((2,), torch.bool)]
    (drawn,) = make_inputs(specs[:1], seed=0, batch=500)
    assert drawn.min() >= 3 and drawn.max() <= 7


class OffsetEmbedding(nn.Module):
    """Token ids from a vocabulary slice 990..999 (ids outside it are invalid): embedding -> linear -> BN1d."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.fc, self.bn = nn.Embedding(10, 4), nn.Linear(4, 6), nn.BatchNorm1d(6)

    def forward(self, ids):
        return self.bn(self.fc(self.embed(ids - 990).mean(1)))


def test_fuse_regenerates_ids_in_the_range_of_the_example():
    ids = torch.tensor([[990, 995, 999], [991, 992, 993]])
    result = bnfold.fuse(OffsetEmbedding().eval(), (ids,))  # draws from 0..7 would index the embedding at -990
    assert result.ok and [f.bn.name for f in result.folded] == ["bn"]


# -- the command line: --input-shape missing, malformed or wrong for the model -------------------------------------
def test_missing_input_shape(state_dict_file, in_root):
    assert_clean_error(run(str(state_dict_file), "--arch", "models.zoo:resnet_digits"), "--input-shape")


@pytest.mark.parametrize("shape", ["2,x,8", "0,1,8,8", "2,1,8,8:complex7"])
def test_malformed_input_shape(state_dict_file, in_root, shape):
    assert_clean_error(run(str(state_dict_file), "--arch", "models.zoo:resnet_digits", "--input-shape", shape))


def test_wrong_input_shape_for_model(state_dict_file, in_root):
    result = run(str(state_dict_file), "--arch", "models.zoo:resnet_digits", "--input-shape", "2,3,8,8")
    assert_clean_error(result, "the model failed on inputs of shape (1, 3, 8, 8)")


# -- ONNX graphs bnfold cannot draw inputs for must say so ---------------------------------------------------------
@POSIX
def test_fuse_huge_declared_input_is_refused_before_allocating(tmp_path):
    """Attack: a graph input declared [1, 100000, 100000] (10**10 floats, 40 GB of random inputs).
    Expected: refused with bnfold's own one-line error naming the input (exit 2) before anything is allocated.
    Today torch tries to allocate 40 GB: under a memory limit that is "RuntimeError: DefaultCPUAllocator: can't
    allocate memory ... please report it"; on a large machine it fills the memory. (The child runs under an
    8 GiB address-space limit so that this test cannot take the machine down.)"""
    path = save(onnx.parser.parse_model("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[1,100000,100000] x) => (float[1,100000,100000] y) {
        y = Relu (x)
    }"""), tmp_path / "huge.onnx")
    child = bnfold_child("fuse", str(path), "-o", str(tmp_path / "out.onnx"), cwd=tmp_path,
                         address_space=8 << 30)
    _, err = child.communicate(timeout=120)
    assert child.returncode == 2, err[-2000:]
    assert err.startswith("error: "), err[-2000:]
    assert "please report" not in err and "Traceback" not in err, err[-2000:]
    assert "allocat" not in err.lower(), err[-2000:]  # bnfold's own refusal, not the allocator's failure


NO_INPUTS = """
<ir_version: 8, opset_import: ["" : 17]>
g () => (float[1,3,2,2] y) {
    c = Constant <value = float[1,3,2,2] {1,2,3,4,5,6,7,8,9,10,11,12}> ()
    z = Conv (c, w)
    y = BatchNormalization (z, s, b, m, v)
}"""


@pytest.mark.parametrize("command", ["fuse", "verify"])
def test_graph_without_inputs_is_not_a_crash(tmp_path, command):
    """Attack: a valid graph with no inputs at all (everything is a constant).
    Expected: folded and proven (exit 0; onnxruntime runs it with no feeds) or a clear refusal (exit 2); never
    a crash. Today: "IndexError: list index out of range" (fuse, bnfold/runtime.parity_inputs reads specs[0])
    and "KeyError: 'determinism'" (verify), both with "please report it"."""
    model = graph(NO_INPUTS, w=np.ones((3, 3, 1, 1)))
    onnx.checker.check_model(model, full_check=True)
    path = save(model, tmp_path / "no_inputs.onnx")
    args = ["fuse", str(path), "-o", str(tmp_path / "out.onnx")] if command == "fuse" else ["verify", str(path)]
    result = cli(*args)
    assert "please report" not in result.output, result.output
    assert result.exit_code in (0, 2), result.output


def test_scalar_graph_input_is_not_a_crash(tmp_path):
    """Attack: a graph whose input is a rank-0 tensor (``float x``, valid ONNX).
    Expected: proven (exit 0) or a clear refusal (exit 2). Today: "IndexError: tuple index out of range ...
    please report it" (bnfold/runtime.parity_inputs takes ``specs[0].shape[0]`` of a shape ``()``)."""
    path = save(onnx.parser.parse_model("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float x) => (float y) {
        y = Relu (x)
    }"""), tmp_path / "scalar.onnx")
    result = cli("fuse", str(path), "-o", str(tmp_path / "out.onnx"))
    assert "please report" not in result.output, result.output
    assert result.exit_code in (0, 2), result.output


def test_unknown_input_element_type_is_a_clean_error(tmp_path):
    """Attack: a graph input whose elem_type is 999 (no such TensorProto.DataType).
    Expected: "ONNX input 'x' has element type 999, which bnfold cannot draw inputs for" (exit 2). Today the
    message itself crashes: DataType.Name(999) raises "ValueError: Enum DataType has no name defined for value
    999 ... please report it" (bnfold/onnx/fuse._torch_dtype; bnfold.onnx.graph._type_name handles this)."""
    info = helper.make_tensor_value_info("x", 999, [2])
    out = onnx.ValueInfoProto(name="y")
    out.type.CopyFrom(info.type)
    model = helper.make_model(helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [info], [out]),
                              opset_imports=[helper.make_opsetid("", 17)])
    path = save(model, tmp_path / "e999.onnx")
    assert_clean_error(cli("fuse", str(path), "-o", str(tmp_path / "out.onnx")))


def test_onnx_input_shape_that_disagrees_with_the_graph_is_refused(tmp_path):
    """Attack: --input-shape of the wrong rank, contradicting a fixed dimension, too many specs, a zero size.
    Expected: exit 2 with one line naming the input and the disagreement, before onnxruntime runs."""
    model = str(save(graph(), tmp_path / "m.onnx"))
    for shape, words in ((["2,2,4"], "rank"), (["2,3,4,4"], "fixed at 2"), (["1,2,4,4", "1,2,4,4"], "gave 2"),
                         (["0,2,4,4"], "positive")):
        result = cli("fuse", model, "-o", str(tmp_path / "out.onnx"),
                     *[a for s in shape for a in ("--input-shape", s)])
        assert_clean_error(result)
        assert words in result.output
