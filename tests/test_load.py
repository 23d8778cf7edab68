"""Loading model files on the command line: a damaged, truncated or unknown file, a pickle named like an ONNX graph,
a state dict without or with the wrong --arch; each ends in one precise error line (exit 2), nothing written."""

from __future__ import annotations

import pickle

import pytest

from tests.cli_helpers import SHAPE, assert_clean_error, assert_usage_error, cli, run
from tests.processes import POSIX, bnfold_child


# -- damaged, truncated and unknown files --------------------------------------------------------------------------
def test_truncated_file(tmp_path, state_dict_file, in_root):
    bad = tmp_path / "truncated.pt"
    bad.write_bytes(state_dict_file.read_bytes()[:2000])
    assert_clean_error(run(str(bad), "--arch", "models.zoo:resnet_digits", *SHAPE), "truncated.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sd.pt", "truncated.pt"]


def test_random_bytes(tmp_path):
    bad = tmp_path / "noise.bin"
    bad.write_bytes(bytes(range(256)) * 8)
    assert_clean_error(run(str(bad), *SHAPE), "not a model file bnfold knows")


def test_missing_file(tmp_path):
    assert_clean_error(run(str(tmp_path / "nope.pt"), *SHAPE), "no such file")


def test_damaged_pt2_gives_one_line_without_torch_logs(tmp_path, program, capfd):
    damaged = tmp_path / "damaged.pt2"
    data = bytearray(program.read_bytes())
    start = data.find(b'"graph_module"')
    assert start > 0
    data[start:start + 14] = b'"graph_modulX"'  # the serialized program no longer parses
    damaged.write_bytes(bytes(data))
    result = cli("fuse", str(damaged))
    assert_usage_error(result, "torch.export program")
    assert "warnings above" not in result.output
    captured = capfd.readouterr()
    assert "Traceback" not in captured.err and "Traceback" not in captured.out


def test_truncated_zip_is_called_damaged(tmp_path, program):
    cut = tmp_path / "cut.pt2"
    cut.write_bytes(program.read_bytes()[: program.stat().st_size // 2])
    assert_usage_error(cli("fuse", str(cut)), "damaged zip archive", "truncated")


@POSIX
def test_pickle_named_model_onnx_gets_one_error_line_and_no_library_warning(tmp_path):
    """Attack: a protocol-4 pickle named model.onnx. Expected: refused (exit 2) with bnfold's "error:" line and
    its Note only. Today torch's weights-only unpickler first prints a two-line UserWarning ("Detected pickle
    protocol 4 ... please file an issue"), so the user sees another library's traceback-like noise and an
    invitation to file an issue (bnfold/load.py _load_torch_file; likewise onnx's "Ignoring unknown external data
    key(s)" warning from bnfold/onnx/io._info)."""
    path = tmp_path / "model.onnx"
    path.write_bytes(pickle.dumps({"w": [1.0, 2.0]}, protocol=4))
    child = bnfold_child("fuse", str(path), "-o", str(tmp_path / "out.onnx"), cwd=tmp_path)
    _, err = child.communicate(timeout=120)
    assert child.returncode == 2, err[-2000:]
    assert err.startswith("error: "), err[-2000:]
    assert "Warning" not in err, err[-2000:]


# -- a state dict and its --arch -----------------------------------------------------------------------------------
@pytest.mark.parametrize(("arch", "fragment"), [
    ("models.zoo", "not of the form package.module:factory"),
    ("no_such_package.mod:f", "cannot import 'no_such_package.mod'"),
    ("models.zoo:no_such_factory", "has no attribute 'no_such_factory'"),
    ("models.zoo:ModelSpec", "calling it with {} failed"),
])
def test_wrong_arch(state_dict_file, in_root, arch, fragment):
    assert_clean_error(run(str(state_dict_file), "--arch", arch, *SHAPE), fragment)


def test_bad_arch_kwargs(state_dict_file, in_root):
    assert_clean_error(run(str(state_dict_file), "--arch", "models.zoo:resnet_digits", "--arch-kwargs", "{num: 1}",
                           *SHAPE), "not valid JSON")


def test_mismatched_state_dict(state_dict_file, in_root):
    result = run(str(state_dict_file), "--arch", "models.zoo:mlp_tiny", "--input-shape", "2,32")
    assert_clean_error(result, "does not match --arch models.zoo:mlp_tiny", "missing", "unexpected")
    result = run(str(state_dict_file), "--arch", "models.resnet:resnet_digits", "--arch-kwargs",
                 '{"num_classes": 7}', *SHAPE)
    assert_clean_error(result, "2 with another shape", "fc.bias: file (10,) vs model (7,)")


def test_state_dict_without_arch(state_dict_file):
    assert_clean_error(run(str(state_dict_file), *SHAPE), "holds a state dict", "--arch")
