"""Bad input: exit 2, a clear one-line message (plus a Note), no traceback, nothing written."""

from __future__ import annotations

import pickle

import pytest
import torch
from click.testing import CliRunner

from bnfold.cli import main

SHAPE = ["--input-shape", "2,1,8,8"]


class _WritesAFile:
    """Unpickling this would create a file: the proof that bnfold never executes an untrusted pickle."""

    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


def run(*args: str):
    return CliRunner().invoke(main, ["fuse", *args])


def assert_clean_error(result, *fragments: str):
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert result.output.startswith("error: ")
    for fragment in fragments:
        assert fragment in result.output


@pytest.fixture
def state_dict_file(tmp_path, digits_model):
    path = tmp_path / "sd.pt"
    torch.save(digits_model.state_dict(), path)
    return path


def test_truncated_file(tmp_path, state_dict_file, in_root):
    bad = tmp_path / "truncated.pt"
    bad.write_bytes(state_dict_file.read_bytes()[:2000])
    assert_clean_error(run(str(bad), "--arch", "models.zoo:resnet_digits", *SHAPE), "truncated.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sd.pt", "truncated.pt"]


def test_random_bytes(tmp_path):
    bad = tmp_path / "noise.bin"
    bad.write_bytes(bytes(range(256)) * 8)
    assert_clean_error(run(str(bad), *SHAPE), "not a model file bnfold knows")


def test_malicious_pickle_is_not_executed(tmp_path):
    victim = tmp_path / "pwned.txt"
    bad = tmp_path / "evil.pt"
    torch.save({"weights": _WritesAFile(str(victim))}, bad)
    assert not victim.exists()
    result = run(str(bad), *SHAPE)
    assert_clean_error(result, "refusing to unpickle", "--trust")
    assert not victim.exists()
    # A legacy (non-zip) plain pickle is refused the same way.
    legacy = tmp_path / "evil.pkl"
    legacy.write_bytes(pickle.dumps(_WritesAFile(str(victim)), protocol=2))
    assert_clean_error(run(str(legacy), *SHAPE))
    assert not victim.exists()


def test_whole_module_pickle_refused_by_default(tmp_path, digits_model, in_root):
    path = tmp_path / "model.pt"
    torch.save(digits_model, path)
    assert_clean_error(run(str(path), *SHAPE), "refusing to unpickle", "models.resnet")
    assert list(tmp_path.iterdir()) == [path]


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


def test_missing_input_shape(state_dict_file, in_root):
    assert_clean_error(run(str(state_dict_file), "--arch", "models.zoo:resnet_digits"), "--input-shape")


@pytest.mark.parametrize("shape", ["2,x,8", "0,1,8,8", "2,1,8,8:complex7"])
def test_malformed_input_shape(state_dict_file, in_root, shape):
    assert_clean_error(run(str(state_dict_file), "--arch", "models.zoo:resnet_digits", "--input-shape", shape))


def test_wrong_input_shape_for_model(state_dict_file, in_root):
    result = run(str(state_dict_file), "--arch", "models.zoo:resnet_digits", "--input-shape", "2,3,8,8")
    assert_clean_error(result, "the model failed on inputs of shape (1, 3, 8, 8)")


def test_missing_file(tmp_path):
    assert_clean_error(run(str(tmp_path / "nope.pt"), *SHAPE), "no such file")


def test_output_equal_to_input_is_refused(state_dict_file, in_root):
    digest = state_dict_file.read_bytes()
    result = run(str(state_dict_file), "-o", str(state_dict_file), "--keep-structure", "--arch",
                 "models.zoo:resnet_digits", *SHAPE)
    assert_clean_error(result, "never overwrites its input")
    assert state_dict_file.read_bytes() == digest


def test_output_folder_missing(state_dict_file, tmp_path, in_root):
    out = tmp_path / "no" / "such" / "dir" / "m.pt2"
    assert_clean_error(run(str(state_dict_file), "-o", str(out), "--arch", "models.zoo:resnet_digits", *SHAPE),
                       "does not exist")


def test_debug_shows_the_traceback(tmp_path):
    bad = tmp_path / "noise.bin"
    bad.write_bytes(b"\x00" * 64)
    result = run(str(bad), *SHAPE, "--debug")
    assert result.exit_code != 0 and result.exception is not None and not isinstance(result.exception, SystemExit)
