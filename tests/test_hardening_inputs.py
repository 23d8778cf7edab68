"""Hardening of comparison and input specs: non-finite outputs, required_rtol, tolerances, shapes, value ranges.

Expected values are computed by hand or with numpy/torch directly, never with the code under test.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

import bnfold
from bnfold.compare import check_tolerance, compare, compare_output
from bnfold.errors import InputSpecError
from bnfold.inputs import InputSpec, make_inputs, parse_input_spec, specs_from_tensors
from bnfold.report import write_json

NAN, INF = float("nan"), float("inf")
FINITE_HINT = "a model's eval output on finite inputs must be finite"


# -- 1. non-finite values never pass ----------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [NAN, INF, -INF])
def test_identical_non_finite_outputs_fail(bad):
    ref = torch.full((2, 3), bad)
    diff = compare_output("y", ref, ref.clone())
    assert not diff.passed
    assert diff.problem.startswith("reference has 6 non-finite value(s) (first at (0, 0))")
    assert FINITE_HINT in diff.problem
    # nothing is finite on both sides: no statistic can be measured
    assert math.isinf(diff.max_abs) and math.isinf(diff.max_rel) and math.isinf(diff.required_rtol)


def test_non_finite_reference_is_named_with_its_count_and_first_index():
    ref = torch.arange(12.0).reshape(3, 4)
    ref[1, 2] = ref[2, 0] = NAN  # row-major: (1, 2) comes first
    diff = compare_output("y", ref, ref.clone())
    assert not diff.passed
    assert diff.problem == ("reference has 2 non-finite value(s) (first at (1, 2)); compared output has 2 non-finite "
                            f"value(s) (first at (1, 2)); {FINITE_HINT}")


def test_non_finite_output_is_named_and_statistics_cover_the_finite_elements():
    ref = torch.tensor([[1.0, -2.0, 4.0], [0.5, 8.0, -1.0]], dtype=torch.float64)
    got = ref + torch.tensor([[1e-3, NAN, 0.0], [-2e-3, 0.0, INF]], dtype=torch.float64)
    diff = compare_output("y", ref, got)
    assert not diff.passed
    assert diff.problem == f"compared output has 2 non-finite value(s) (first at (0, 1)); {FINITE_HINT}"
    # closed form over the four elements finite on both sides: errors 1e-3, 0, 2e-3, 0; scale max|ref| = 8
    assert diff.max_abs == pytest.approx(2e-3, rel=1e-9)
    assert diff.mean_abs == pytest.approx(3e-3 / 4, rel=1e-9)
    assert diff.max_rel == pytest.approx(2e-3 / 8, rel=1e-9)
    assert diff.worst_index == (1, 0) and diff.scale == 8.0
    assert math.isinf(diff.required_rtol)  # no rtol makes a NaN pass


def test_a_model_whose_outputs_are_all_nan_fails_parity():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)).eval()
    with torch.no_grad():
        model[1].bias.fill_(NAN)  # every output NaN, in the original and in the folded model alike
    result = bnfold.fuse(model, (torch.randn(2, 3, 4, 4),))
    assert not result.ok
    assert all(not o.passed and "non-finite" in o.problem for c in result.parity for o in c.outputs)


def test_comparison_of_non_finite_outputs_is_json_safe(tmp_path):
    ref = torch.full((2,), NAN)
    comparison = compare("batch 1", ref, ref.clone())
    path = tmp_path / "report.json"
    write_json(path, comparison.to_dict())
    output = json.loads(path.read_text())["outputs"][0]  # strict JSON: no bare NaN/Infinity tokens
    assert output["passed"] is False and output["max_abs"] == "inf" and output["required_rtol"] == "inf"


# -- 2. required_rtol respects atol -----------------------------------------------------------------------------
# ref scale max|ref| = 8. Errors 0.005, 0.02, 0.04, 0.001 -> relative 6.25e-4, 2.5e-3, 5e-3, 1.25e-4.
REF = [1.0, 2.0, 4.0, -8.0]
ERR = [0.005, 0.02, 0.04, 0.001]


@pytest.mark.parametrize(("atol", "required"), [
    (0.0, 0.04 / 8),     # every element exceeds atol: the worst relative error
    (0.03, 0.04 / 8),    # only 0.04 exceeds atol
    (0.041, 0.0),        # none exceeds atol: any rtol passes
    (1.0, 0.0),
])
def test_required_rtol_is_the_worst_relative_error_beyond_atol(atol, required):
    ref = torch.tensor(REF, dtype=torch.float64)
    got = ref + torch.tensor(ERR, dtype=torch.float64)
    diff = compare_output("y", ref, got, atol=atol, rtol=0.0)
    assert diff.required_rtol == pytest.approx(required, rel=1e-9, abs=1e-15)
    assert diff.to_dict()["required_rtol"] == diff.required_rtol
    assert diff.max_rel == pytest.approx(0.04 / 8, rel=1e-9)  # max_rel itself ignores atol


def test_required_rtol_is_exactly_the_rtol_that_passes():
    ref = torch.tensor(REF, dtype=torch.float64)
    got = ref + torch.tensor(ERR, dtype=torch.float64)
    needed = 0.04 / 8
    assert compare_output("y", ref, got, atol=0.01, rtol=needed * (1 + 1e-9)).passed
    assert not compare_output("y", ref, got, atol=0.01, rtol=needed * (1 - 1e-6)).passed


# -- 3. tolerances are validated ------------------------------------------------------------------------------
BAD_TOLERANCES = [NAN, INF, -INF, -1e-6, True, "1e-3"]


@pytest.mark.parametrize("value", BAD_TOLERANCES)
def test_check_tolerance_refuses_unusable_values(value):
    with pytest.raises(InputSpecError) as info:
        check_tolerance("--atol", value)
    assert info.value.message == f"--atol must be a finite number >= 0, got {value!r}"
    assert info.value.hint


def test_check_tolerance_message_for_nan():
    with pytest.raises(InputSpecError, match=r"^--atol must be a finite number >= 0, got nan"):
        check_tolerance("--atol", NAN)


@pytest.mark.parametrize(("value", "expected"), [(None, None), (0, 0.0), (1e-3, 1e-3), (np.float32(0.5), 0.5)])
def test_check_tolerance_accepts_numbers_and_none(value, expected):
    assert check_tolerance("--rtol", value) == expected


@pytest.mark.parametrize("which", ["atol", "rtol"])
@pytest.mark.parametrize("value", BAD_TOLERANCES)
def test_python_api_refuses_bad_tolerances(which, value):
    ref = torch.tensor([1.0, 2.0])
    far = ref + 100.0  # a NaN/Inf tolerance would have turned this failure into a pass
    with pytest.raises(InputSpecError, match=f"^{which} must be a finite number >= 0"):
        compare("c", ref, far, **{which: value})
    with pytest.raises(InputSpecError, match=f"^{which} must be a finite number >= 0"):
        compare_output("y", ref, far, **{which: value})


def test_zero_tolerances_pass_identical_outputs():
    ref = torch.tensor([1.0, -2.0, 0.0])
    assert compare("c", ref, ref.clone(), atol=0.0, rtol=0.0)


# -- 4. shapes ------------------------------------------------------------------------------------------------
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


# -- 5. value ranges ------------------------------------------------------------------------------------------
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
