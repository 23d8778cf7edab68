"""Calibration data (``--data``, bnfold.data): the formats it is read from; bad data and bad data sources end in one
precise error, never in NaN statistics or a crash.

Library cases use a tiny conv/BN model on 8x8 inputs; CLI cases use ``resnet_digits`` (1x8x8) and check the
exit code 2 and the single ``error:`` line together.
"""

from __future__ import annotations

import itertools
import textwrap

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn

from bnfold.cli import main
from bnfold.data import DataError, load_data
from bnfold.errors import BnfoldError, ModelRunError
from bnfold.recalibrate import recalibrate
from models import zoo


def tiny() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.ReLU(), nn.BatchNorm2d(4)).eval()


def inputs(n: int = 40, channels: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, channels, 8, 8, generator=torch.Generator().manual_seed(seed))


def statistics(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if "running" in k}


def assert_same_statistics(a: nn.Module, b: nn.Module) -> None:
    for key, value in statistics(a).items():
        torch.testing.assert_close(value, statistics(b)[key], rtol=0, atol=0)


# --- 1. empty and non-finite data -----------------------------------------------------------------------


@pytest.mark.parametrize("batches", [[], lambda: [], [torch.empty(0, 3, 8, 8)]], ids=["list", "callable", "0-rows"])
def test_empty_data_is_refused(batches):
    with pytest.raises(DataError, match="the calibration data is empty") as info:
        recalibrate(tiny(), batches)
    assert info.value.hint


@pytest.mark.parametrize(("value", "name"), [(float("nan"), "NaN"), (float("inf"), "inf"), (-float("inf"), "inf")])
@pytest.mark.parametrize("method", ["layerwise", "global"])
def test_non_finite_sample_is_named_by_its_index_over_all_batches(value, name, method):
    x = inputs()
    x[17, 1, 2, 3] = value  # batch 2 of 8-input batches: the index counts over the batches
    with pytest.raises(DataError) as info:
        recalibrate(tiny(), list(x.split(8)), method=method)
    assert info.value.message == f"calibration sample 17 has {name} values" and info.value.hint


def test_model_producing_nan_names_the_batchnorm():
    model = tiny()
    with torch.no_grad():
        model[0].weight.fill_(float("inf"))  # inf * (inputs of both signs) -> NaN at the first BN's input
    with pytest.raises(BnfoldError, match=r"^BatchNorm '1': the recalibrated statistics are not finite: .*NaN/inf"):
        recalibrate(model, list(inputs().split(8)))


def test_variance_overflowing_the_buffer_dtype_names_the_batchnorm():
    model = tiny()
    with torch.no_grad():
        model[0].weight.mul_(1e25)  # finite float32 activations whose variance (~1e50) float32 cannot hold
    with pytest.raises(BnfoldError, match=r"^BatchNorm '1': .*variance, up to .*e\+\d+, overflows float32"):
        recalibrate(model, list(inputs().split(8)))


# --- 2. one-shot iterators ------------------------------------------------------------------------------


def test_generator_without_samples_is_refused_with_the_fix():
    batches = inputs().split(8)
    with pytest.raises(DataError, match="one-shot generator") as info:
        recalibrate(tiny(), (b for b in batches))
    assert "callable" in info.value.hint and "samples=N" in info.value.hint


@pytest.mark.parametrize("method", ["layerwise", "global"])
def test_generator_with_samples_is_read_once_and_matches_a_list(method):
    batches = list(inputs().split(8))
    expected = recalibrate(tiny(), batches, samples=36, method=method)
    result = recalibrate(tiny(), (b for b in batches), samples=36, method=method)
    assert result.samples == 36 and [d.samples for d in result.layers] == [36 * 64, 36 * 64]
    assert_same_statistics(result.model, expected.model)


def test_endless_iterator_with_samples_stops_at_samples():
    batches = list(inputs().split(8))
    result = recalibrate(tiny(), itertools.cycle(batches), samples=20)
    assert result.samples == 20
    assert_same_statistics(result.model, recalibrate(tiny(), batches, samples=20).model)


def test_callable_returning_a_fresh_generator_is_fine():
    batches = list(inputs().split(8))
    result = recalibrate(tiny(), lambda: (b for b in batches))
    assert result.samples == 40
    assert_same_statistics(result.model, recalibrate(tiny(), batches).model)


def test_callable_returning_the_same_iterator_is_refused():
    shared = iter(inputs().split(8))
    with pytest.raises(DataError, match="returned the same iterator twice"):
        recalibrate(tiny(), lambda: shared)


# --- batches of the wrong kind (Python API) -------------------------------------------------------------


@pytest.mark.parametrize(("batches", "match"), [
    (inputs(), r"one tensor of shape \(40, 3, 8, 8\)"),
    ([np.zeros((8, 3, 8, 8), np.float32)], "got ndarray"),
    ([{"label": 3}], r"got a dict of \(int\)"),
    ([torch.tensor(1.0)], "0-d tensor"),
    (5, "got int"),
    (lambda: 5, "callable returned a int"),
], ids=["whole-tensor", "ndarray", "dict-without-tensor", "0-d", "int", "callable-int"])
def test_batches_of_the_wrong_kind_are_refused(batches, match):
    with pytest.raises(DataError, match=match) as info:
        recalibrate(tiny(), batches)
    assert info.value.hint


def test_samples_must_be_positive():
    with pytest.raises(BnfoldError, match="--samples must be a positive integer, got 0"):
        recalibrate(tiny(), list(inputs().split(8)), samples=0)


# --- 4. the model cannot run on the data ----------------------------------------------------------------


def test_model_run_error_points_at_the_data_shape_and_keeps_the_cause():
    with pytest.raises(ModelRunError) as info:
        recalibrate(tiny(), list(inputs(channels=1).split(8)))
    error = info.value
    assert "(8, 1, 8, 8)" in error.message  # run_model's message, unchanged
    assert "the calibration inputs have shape (8, 1, 8, 8) (float32)" in error.hint and "--data" in error.hint
    assert "--input-shape" not in error.hint
    assert isinstance(error.__cause__, ModelRunError) and isinstance(error.__cause__.__cause__, RuntimeError)


# --- 3. reading --data ----------------------------------------------------------------------------------


def test_data_formats(tmp_path):
    from PIL import Image

    from bnfold.data import DataError, load_data

    array = np.random.default_rng(0).random((10, 3, 4, 4), dtype=np.float32)
    np.save(tmp_path / "x.npy", array)
    np.savez(tmp_path / "x.npz", inputs=array, labels=np.arange(10))
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(5):
        Image.fromarray((array[i].transpose(1, 2, 0) * 255).astype(np.uint8)).save(folder / f"{i}.png")
    for spec, n in ((tmp_path / "x.npy", 10), (tmp_path / "x.npz", 10), (folder, 5)):
        batches = list(load_data(str(spec), batch_size=4)())
        assert sum(b.shape[0] for b in batches) == n and batches[0].shape[1:] == (3, 4, 4)
    np.savez(tmp_path / "many.npz", a=array, b=array)
    with pytest.raises(DataError, match="looks for one of x"):
        load_data(str(tmp_path / "many.npz"))


def test_batch_size_must_be_positive(tmp_path):
    np.save(tmp_path / "x.npy", inputs().numpy())
    for size in (0, -3):
        with pytest.raises(DataError) as info:
            load_data(str(tmp_path / "x.npy"), batch_size=size)
        assert info.value.message == f"--batch-size must be a positive integer, got {size}"


@pytest.mark.parametrize("suffix", [".npy", ".npz"])
def test_empty_array_file_is_refused_naming_the_file(tmp_path, suffix):
    path = tmp_path / f"empty{suffix}"
    empty = np.zeros((0, 3, 8, 8), np.float32)
    np.save(path, empty) if suffix == ".npy" else np.savez(path, x=empty)
    with pytest.raises(DataError, match=r"empty\.np[yz]: the array is empty \(shape \(0, 3, 8, 8\)\)"):
        load_data(str(path))


@pytest.mark.parametrize(("array", "match"), [
    (np.array(["a", "bc"]), "the array has dtype <U2"),
    (np.array(3.0), "the array is a single number"),
], ids=["strings", "scalar"])
def test_arrays_that_are_not_inputs_are_refused(tmp_path, array, match):
    np.save(tmp_path / "s.npy", array)
    with pytest.raises(DataError, match=f"s.npy: {match}"):
        load_data(str(tmp_path / "s.npy"))


def test_values_overflowing_the_model_dtype_are_refused(tmp_path):
    np.save(tmp_path / "big.npy", np.full((4, 3, 8, 8), 1e6, np.float32))
    with pytest.raises(DataError, match="values up to 1e\\+06 overflow the model's dtype torch.float16"):
        load_data(str(tmp_path / "big.npy"), dtype=torch.float16)


def test_missing_array_file_says_so(tmp_path):
    with pytest.raises(DataError, match="nope.npz'?: no such file"):
        load_data(str(tmp_path / "nope.npz"))


def test_non_image_file_with_an_image_suffix_is_named(tmp_path):
    from PIL import Image

    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "good.png")
    (tmp_path / "a.png").write_text("not an image")
    with pytest.raises(DataError, match=r"a\.png: cannot read it as an image: cannot identify image file"):
        load_data(str(tmp_path))


CALIB_MODULE = '''
import torch

NOT_CALLABLE = 3

def raises_on_call():
    raise ValueError("no split named 'tran'")

def raises_while_iterating():
    yield torch.zeros(2, 1, 8, 8)
    raise ValueError("corrupt shard 3")

def returns_int():
    return 5

def fresh_generator():
    g = torch.Generator().manual_seed(0)
    return (torch.randn(8, 1, 8, 8, generator=g) for _ in range(3))
'''


@pytest.fixture
def calib_module(tmp_path, monkeypatch):
    """An importable module of --data functions (same source for every test, so a cached import is fine)."""
    (tmp_path / "_bnfold_calib_data.py").write_text(textwrap.dedent(CALIB_MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))
    return "_bnfold_calib_data"


@pytest.mark.parametrize(("function", "match"), [
    ("raises_on_call", "raised ValueError: no split named 'tran'"),
    ("raises_while_iterating", "raised ValueError: corrupt shard 3"),
    ("returns_int", "returned a int, not an iterable of batches"),
])
def test_data_function_failures_become_data_errors(calib_module, function, match):
    batches = load_data(f"{calib_module}:{function}")
    with pytest.raises(DataError, match=f"^--data '{calib_module}:{function}' {match}") as info:
        list(batches())
    assert info.value.hint
    assert function == "returns_int" or isinstance(info.value.__cause__, ValueError)  # for --debug


@pytest.mark.parametrize(("function", "match"), [
    ("NOT_CALLABLE", "is a int, not a function"),
    ("missing", "has no attribute 'missing'"),
])
def test_data_attribute_that_is_not_a_function_is_refused(calib_module, function, match):
    with pytest.raises(DataError, match=match):
        load_data(f"{calib_module}:{function}")


def test_data_function_returning_a_generator_is_called_per_pass(calib_module):
    result = recalibrate(tiny_digits(), load_data(f"{calib_module}:fresh_generator"))
    assert result.samples == 24


def tiny_digits() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU(), nn.BatchNorm2d(2)).eval()


# --- the CLI: exit 2 and one error line -----------------------------------------------------------------


@pytest.fixture
def digits_state(tmp_path, in_root):
    state = tmp_path / "digits.pt"
    torch.save(zoo.build("resnet_digits").state_dict(), state)
    return state


def fails_cleanly(args: list[str]) -> str:
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    assert result.output.count("error:") == 1 and "Note: " in result.output, result.output
    assert "Traceback" not in result.output and "please report" not in result.output, result.output
    return result.output


def recalibrate_args(state, data, *extra) -> list[str]:
    return ["recalibrate", str(state), "--data", str(data), "--arch", "models.zoo:resnet_digits",
            "-o", str(state.with_name("out.pt")), *extra]


def digits(n: int = 40, channels: int = 1) -> np.ndarray:
    return np.random.default_rng(0).normal(size=(n, channels, 8, 8)).astype(np.float32)


def test_cli_empty_array(digits_state, tmp_path):
    np.save(tmp_path / "empty.npy", np.zeros((0, 1, 8, 8), np.float32))
    assert "the array is empty" in fails_cleanly(recalibrate_args(digits_state, tmp_path / "empty.npy"))
    assert not (tmp_path / "out.pt").exists()


def test_cli_nan_sample(digits_state, tmp_path):
    x = digits()
    x[17, 0, 4, 4] = np.nan
    np.savez(tmp_path / "nan.npz", x=x)
    output = fails_cleanly(recalibrate_args(digits_state, tmp_path / "nan.npz", "--batch-size", "8"))
    assert "error: calibration sample 17 has NaN values" in output
    assert not (tmp_path / "out.pt").exists()


def test_cli_verify_with_nan_data_fails_instead_of_reporting_nothing(digits_state, tmp_path):
    x = digits()
    x[3] = np.inf
    np.save(tmp_path / "inf.npy", x)
    output = fails_cleanly(["verify", str(digits_state), "--arch", "models.zoo:resnet_digits", "--input-shape",
                            "4,1,8,8", "--data", str(tmp_path / "inf.npy"), "--skip", "onnx"])
    assert "calibration sample 3 has inf values" in output


def test_cli_text_file_named_png(digits_state, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    (folder / "a.png").write_text("hello")
    output = fails_cleanly(recalibrate_args(digits_state, folder))
    assert "a.png: cannot read it as an image" in output


def test_cli_data_function_raises(digits_state, calib_module):
    output = fails_cleanly(recalibrate_args(digits_state, f"{calib_module}:raises_on_call"))
    assert f"error: --data '{calib_module}:raises_on_call' raised ValueError: no split named 'tran'" in output


def test_cli_data_of_the_wrong_shape_points_at_the_data(digits_state, tmp_path):
    np.save(tmp_path / "rgb.npy", digits(16, channels=3))
    output = fails_cleanly(recalibrate_args(digits_state, tmp_path / "rgb.npy"))
    assert "the calibration inputs have shape (16, 3, 8, 8)" in output and "--input-shape" not in output
