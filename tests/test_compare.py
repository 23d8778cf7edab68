"""Comparing outputs (bnfold.compare): non-finite values never pass (so a model whose outputs are not finite fails
parity, torch and ONNX alike), required_rtol respects atol, tolerances are validated in the Python API and on the
command line.

Expected values are computed by hand or with numpy/torch directly, never with the code under test.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch
from torch import nn

import bnfold
from bnfold.compare import check_tolerance, compare, compare_output
from bnfold.report import parity_line
from bnfold.errors import InputSpecError
from bnfold.report import write_json
from tests.cli_helpers import assert_usage_error, cli
from tests.nets import X, nonfinite_models
from tests.onnx_graphs import CONV_BN, graph, save

NAN, INF = float("nan"), float("inf")


FINITE_HINT = "a model's eval output on finite inputs must be finite"


# -- semantics -----------------------------------------------------------------------------------------------------
def test_compare_semantics():
    ref = torch.tensor([1.0, 2.0, 4.0])
    assert compare("c", ref, ref + 1e-6)
    # rel error is to the output's scale (4.0): 0.01 / 4 = 2.5e-3 fails rtol 1e-3 and atol 1e-5
    failing = compare("c", ref, ref + torch.tensor([0.0, 0.01, 0.0]), atol=1e-5, rtol=1e-3)
    assert not failing and failing.outputs[0].worst_index == (1,)
    assert failing.outputs[0].max_rel == pytest.approx(0.0025)
    # an element fails only when both tolerances are exceeded
    assert compare("c", ref, ref + 0.01, atol=0.02, rtol=0.0)
    assert not compare("c", ref, torch.tensor([1.0, float("nan"), 4.0]))
    assert not compare("c", ref, ref[:2])
    assert not compare("c", {"a": ref}, {"b": ref})


# -- non-finite values never pass ----------------------------------------------------------------------------------
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


def test_fuse_of_a_nan_model_fails(tmp_path):
    model, _ = nonfinite_models()["inf weight"]
    result = bnfold.fuse(model, X)
    assert not result.ok


@pytest.mark.parametrize("case", ["var-nan", "var0-eps0", "output-inf"])
def test_non_finite_graphs_never_pass(tmp_path, case):
    """Attack: BN running_var NaN; running_var 0 with epsilon 0; a graph whose output is x/0. Expected: the BN is
    not folded into non-finite weights, and since the outputs are not finite the run fails (exit 1), nothing
    written."""
    if case == "var-nan":
        model = graph(v=[np.nan, 0.5, 0.5])
    elif case == "var0-eps0":
        model = graph(eps=0.0, v=[0.0, 0.5, 0.5])
    else:
        model = graph(CONV_BN.replace("y = BatchNormalization (z, s, b, m, v)",
                                      "q = BatchNormalization (z, s, b, m, v)\n"
                                      "    zero = Constant <value = float {0.0}> ()\n    y = Div (q, zero)"))
    out = tmp_path / "out.onnx"
    result = cli("fuse", str(save(model, tmp_path / "m.onnx")), "-o", str(out))
    assert result.exit_code == 1, result.output
    assert not out.exists()


# -- required_rtol respects atol -----------------------------------------------------------------------------------
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


# -- tolerances are validated --------------------------------------------------------------------------------------
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


@pytest.mark.parametrize("flag, value", [("--atol", "nan"), ("--rtol", "nan"), ("--atol", "inf"),
                                         ("--rtol", "-1e-3")])
def test_tolerances_must_be_finite_and_non_negative(program, flag, value):
    assert_usage_error(cli("fuse", str(program), flag, value, "-o", os.devnull + ".never"), flag)
    assert_usage_error(cli("verify", str(program), flag, value), flag)


def test_the_verdict_line_says_when_every_element_passed_by_atol():
    """Issue 15: ``max rel 0.00281 ... (min rtol to pass 0)`` read as a contradiction; it now says why."""
    ref = torch.tensor([1e-3, 1.0])
    close = compare("batch 1", {"y": ref}, {"y": ref + torch.tensor([3e-6, 0.0])}, atol=1e-5, rtol=1e-4)
    line = parity_line(close, close.outputs[0])
    assert line.startswith("PASSED") and "(min rtol to pass 0, every element within atol)" in line
    exact = compare("batch 1", {"y": ref}, {"y": ref.clone()}, atol=1e-5, rtol=1e-4)
    assert "(min rtol to pass 0)" in parity_line(exact, exact.outputs[0])
    beyond = compare("batch 1", {"y": ref}, {"y": ref + torch.tensor([0.0, 5e-5])}, atol=1e-5, rtol=1e-4)
    assert "within atol" not in parity_line(beyond, beyond.outputs[0])
