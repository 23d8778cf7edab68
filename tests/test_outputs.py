"""Where outputs go: an output never overwrites an input (the model, its external data files, the calibration
data) or another output, however it is spelled (the same path, a symlink, a hard link); a missing folder is named."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

from bnfold.onnx.io import load_onnx
from tests.cli_helpers import SHAPE, assert_clean_error, assert_usage_error, cli, run
from tests.conftest import sha256
from tests.nets import net
from tests.onnx_graphs import graph, save, with_data_file


# -- an ONNX model's external data files are inputs too ------------------------------------------------------------
def test_fuse_refuses_an_output_that_is_the_inputs_external_data_file(tmp_path):
    """Attack: ``bnfold fuse a.onnx -o weights.bin`` where a.onnx keeps its tensors in weights.bin.
    Expected: refused before anything runs (exit 2, "never overwrites its inputs"); weights.bin unchanged, so
    a.onnx still loads. Today the folded model is written over weights.bin and a.onnx is destroyed."""
    model = with_data_file(tmp_path, "a.onnx", "weights.bin")
    before = (tmp_path / "weights.bin").read_bytes()
    result = cli("fuse", str(model), "-o", str(tmp_path / "weights.bin"))
    assert_clean_error(result)
    assert (tmp_path / "weights.bin").read_bytes() == before
    load_onnx(model)


def test_fuse_refuses_an_output_whose_data_file_is_the_inputs_data_file(tmp_path):
    """Attack: b.onnx keeps its tensors in ``out.onnx.data``; ``bnfold fuse b.onnx -o out.onnx`` writes its own
    data file to ``out.onnx.data`` (the input had external data). Expected: refused (exit 2), the input's data
    file untouched. Today it is replaced, and b.onnx no longer loads."""
    model = with_data_file(tmp_path, "b.onnx", "out.onnx.data")
    before = (tmp_path / "out.onnx.data").read_bytes()
    result = cli("fuse", str(model), "-o", str(tmp_path / "out.onnx"))
    assert_clean_error(result)
    assert (tmp_path / "out.onnx.data").read_bytes() == before
    load_onnx(model)


def test_verify_refuses_a_report_written_over_the_models_external_data(tmp_path):
    """Attack: ``bnfold verify a.onnx --json weights.bin`` where a.onnx keeps its tensors in weights.bin.
    Expected: refused (exit 2), weights.bin untouched. Today the JSON report replaces the model's weights."""
    model = with_data_file(tmp_path, "a.onnx", "weights.bin")
    before = (tmp_path / "weights.bin").read_bytes()
    result = cli("verify", str(model), "--json", str(tmp_path / "weights.bin"))
    assert_clean_error(result)
    assert (tmp_path / "weights.bin").read_bytes() == before


def test_output_clashes_are_refused(tmp_path):
    """Attack: -o equal to the input, a symlink or a hard link to it; --external-data with -o whose .data is a
    folder; --json equal to the data file. Expected: each refused before anything runs (exit 2)."""
    model = save(graph(), tmp_path / "m.onnx")
    os.symlink(model, tmp_path / "link.onnx")
    os.link(model, tmp_path / "hard.onnx")
    (tmp_path / "x.onnx.data").mkdir()
    before = model.read_bytes()
    for args in (["-o", str(model)], ["-o", str(tmp_path / "link.onnx")], ["-o", str(tmp_path / "hard.onnx")],
                 ["-o", str(tmp_path / "x.onnx"), "--external-data"],
                 ["-o", str(tmp_path / "y.onnx"), "--external-data", "--json", str(tmp_path / "y.onnx.data")]):
        assert_clean_error(cli("fuse", str(model), *args))
    assert model.read_bytes() == before


# -- outputs never overwrite inputs or each other ------------------------------------------------------------------
@pytest.mark.parametrize("args", [
    ["--json", "{model}"],
    ["-o", "{out}", "--json", "{out}"],
    ["-o", "{link}"],
    ["--json", "{link}"],
])
def test_fuse_outputs_never_clash(tmp_path, program, args):
    model = tmp_path / "m.pt2"
    shutil.copy(program, model)
    os.link(model, tmp_path / "hardlink.pt2")
    before = sha256(model)
    values = {"model": str(model), "out": str(tmp_path / "o.pt2"), "link": str(tmp_path / "hardlink.pt2")}
    result = cli("fuse", str(model), *[a.format(**values) for a in args])
    assert_usage_error(result, "never overwrites")
    assert sha256(model) == before and not (tmp_path / "o.pt2").exists()


def test_verify_report_paths_never_clash(tmp_path, program):
    model = tmp_path / "m.pt2"
    shutil.copy(program, model)
    before = sha256(model)
    assert_usage_error(cli("verify", str(model), "--junit", str(model)), "--junit")
    assert_usage_error(cli("verify", str(model), "--json", str(tmp_path / "r"), "--junit", str(tmp_path / "r")),
                       "--junit")
    assert sha256(model) == before


def test_recalibrate_output_is_not_its_data(tmp_path, in_root):
    import numpy as np

    model = tmp_path / "sd.pt"
    torch.save(net().state_dict(), model)
    data = tmp_path / "calib.npy"
    np.save(data, np.random.default_rng(0).standard_normal((8, 3, 8, 8)).astype("float32"))
    before = sha256(data)
    result = cli("recalibrate", str(model), "--arch", "tests.nets:net", "--data", str(data),
                 "-o", str(data))
    assert_usage_error(result, "--data")
    assert sha256(data) == before


def test_output_equal_to_input_is_refused(state_dict_file, in_root):
    digest = state_dict_file.read_bytes()
    result = run(str(state_dict_file), "-o", str(state_dict_file), "--keep-structure", "--arch",
                 "models.zoo:resnet_digits", *SHAPE)
    assert_clean_error(result, "never overwrites its input")
    assert state_dict_file.read_bytes() == digest


def test_output_folder_missing_is_created(state_dict_file, tmp_path, in_root):
    """Issue 15: ``-o`` into folders that do not exist creates them (it was refused before)."""
    out = tmp_path / "no" / "such" / "dir" / "m.pt2"
    result = run(str(state_dict_file), "-o", str(out), "--arch", "models.zoo:resnet_digits", *SHAPE)
    assert result.exit_code == 0, result.output
    assert out.is_file() and len(torch.export.load(str(out)).graph_signature.user_inputs) == 1
