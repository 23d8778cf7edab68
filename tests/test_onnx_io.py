"""Reading and writing ONNX files: damaged and disguised files, IR versions, opsets and domains bnfold does not
read, external data (only regular files in the model's folder, checked before anything is read), and written
graphs that pass onnx.checker."""

from __future__ import annotations

import os
import pickle

import numpy as np
import onnx
import onnx.parser
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from bnfold.errors import BnfoldError, LoadError
from bnfold.onnx.fold import discover_graph, fold_graph
from bnfold.onnx.graph import MAX_OPSET
from bnfold.onnx.io import has_external_data, load_onnx, save_onnx
from tests.cli_helpers import assert_clean_error, assert_usage_error, cli
from tests.onnx_graphs import FOLDS, _check, build, feeds, graph, header, run, save, with_external
from tests.processes import POSIX


# -- damaged and disguised files -----------------------------------------------------------------------------------
def test_invalid_protobuf_is_a_load_error(tmp_path):
    path = tmp_path / "broken.onnx"
    path.write_bytes(b"\x0a\xff\xff\xff\xff\x0f garbage")
    with pytest.raises(LoadError, match="not an ONNX model") as info:
        load_onnx(path)
    assert "\n" not in info.value.message


@pytest.mark.parametrize("content", [pickle.dumps({"a": 1}), b"\x08\x07garbage\xff\xff\xff"], ids=["pickle", "junk"])
def test_verify_onnx_option_that_is_not_an_onnx_file_is_a_load_error(tmp_path, content):
    """Attack: ``bnfold verify MODEL --onnx FILE`` where FILE is a pickle or junk, not a protobuf.
    Expected: a LoadError (exit 2, one line, no "please report it"). Today protobuf's DecodeError escapes
    (bnfold/onnx/check.py calls onnx.load directly)."""
    path = tmp_path / "model.onnx"
    path.write_bytes(content)
    with pytest.raises(BnfoldError):
        from bnfold.verify import verify

        verify(nn.ReLU(), (torch.randn(2, 2),), onnx=path, checks=("onnx",))


@pytest.mark.parametrize("dims", [[10**12], [2**40, 2**40]], ids=["1e12-elements", "int64-overflow"])
def test_tensor_declaring_more_elements_than_it_holds_is_a_load_error(tmp_path, dims):
    """Attack: the BN's running_var declares 10**12 elements (or a shape whose element count overflows int64)
    but holds 3 floats. Expected: refused when loaded (LoadError naming the tensor; exit 2 on the command line).
    Today bnfold.onnx.io.load_onnx accepts it and the fold dies in numpy ("ValueError: cannot reshape array of
    size 3 ... please report it")."""
    model = graph()
    var = next(t for t in model.graph.initializer if t.name == "v")
    del var.dims[:]
    var.dims.extend(dims)
    path = save(model, tmp_path / "model.onnx")
    with pytest.raises(LoadError, match="'v'"):
        load_onnx(path)
    assert_clean_error(cli("fuse", str(path), "-o", str(tmp_path / "out.onnx")))


def test_missing_onnx_file(program, tmp_path):
    assert_usage_error(cli("verify", str(program), "--onnx", str(tmp_path / "missing.onnx")), "no such file")


# -- IR versions, opsets and domains -------------------------------------------------------------------------------
@pytest.mark.parametrize("change", ["ir99", "opset6", "opset30", "custom-domain"])
def test_versions_and_domains_bnfold_does_not_fold_are_load_errors(tmp_path, change):
    """Attack: IR version 99, opset 6, opset 30, an operator from an unknown domain. Expected: exit 2, one line."""
    model = graph()
    if change == "ir99":
        model.ir_version = 99
    elif change.startswith("opset"):
        model.opset_import[0].version = int(change.removeprefix("opset"))
    else:
        model.graph.node[0].domain = "com.evil"
        model.opset_import.append(helper.make_opsetid("com.evil", 1))
    assert_clean_error(cli("fuse", str(save(model, tmp_path / "m.onnx")), "-o", str(tmp_path / "out.onnx")))


@pytest.mark.parametrize("opset, words", [(6, "older than bnfold folds"), (MAX_OPSET + 1, "newer than the installed")])
def test_unsupported_opsets_are_load_errors(opset, words):
    model = onnx.parser.parse_model(f'<ir_version: 8, opset_import: ["" : {opset}]>\n'
                                    "g (float[2] x) => (float[2] y) { y = Relu (x) }")
    with pytest.raises(LoadError, match=words):
        fold_graph(model)
    with pytest.raises(LoadError, match=words):
        discover_graph(model)


def test_unknown_domain_is_a_load_error(tmp_path):
    model = onnx.parser.parse_model('<ir_version: 8, opset_import: ["" : 17, "com.example" : 1]>\n'
                                    "g (float[2] x) => (float[2] y) { y = com.example.Frob (x) }")
    path = tmp_path / "custom.onnx"
    onnx.save(model, path)
    with pytest.raises(LoadError, match="domain 'com.example'"):
        load_onnx(path)


# -- external data -------------------------------------------------------------------------------------------------
# Weights of 4.5 KiB: above the 1 KiB under which tensors stay inline in the model file.
WIDE = header() + """g (float[N,8,6,6] x, float[16,8,3,3] w1, float[16] s1, float[16] b1, float[16] m1, float[16] v1,
                      float[8,16,3,3] w2, float[8] s2, float[8] b2, float[8] m2, float[8] v2) => (float[N,8,6,6] y) {
    z1 = Conv <pads = [1,1,1,1]> (x, w1)
    a1 = BatchNormalization (z1, s1, b1, m1, v1)
    r1 = Relu (a1)
    z2 = Conv <pads = [1,1,1,1]> (r1, w2)
    y = BatchNormalization (z2, s2, b2, m2, v2)
}"""


def test_external_data_round_trip(tmp_path):
    model = build(WIDE)
    (tmp_path / "in").mkdir()
    source = tmp_path / "in" / "model.onnx"
    onnx.save_model(build(WIDE), str(source), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="weights.bin", size_threshold=0)  # (save_model moves the data out of what it saves)
    assert has_external_data(source)
    loaded = load_onnx(source)
    result = fold_graph(loaded)
    out = tmp_path / "out.onnx"
    written = save_onnx(result.model, out, source=source)
    assert written == [out, tmp_path / "out.onnx.data"]
    assert has_external_data(out) and out.stat().st_size < 4096
    _check(model, load_onnx(out))
    onnx.checker.check_model(str(out), full_check=True)
    inputs = feeds(model)
    np.testing.assert_array_equal(run(str(out), inputs)[0], run(result.model, inputs)[0])


def test_inline_models_stay_one_file_unless_asked(tmp_path):
    result = fold_graph(build(WIDE))
    out = tmp_path / "out.onnx"
    assert save_onnx(result.model, out) == [out]
    assert not has_external_data(out)
    asked = tmp_path / "ext.onnx"
    assert save_onnx(result.model, asked, external_data=True) == [asked, tmp_path / "ext.onnx.data"]
    assert has_external_data(asked)


def test_models_over_the_size_limit_get_a_data_file(tmp_path):
    """Protobuf's 2 GB limit, lowered to a few kilobytes: the same code path as a real 2 GB model."""
    model = build(WIDE)
    result = fold_graph(model)
    size = len(result.model.SerializeToString())
    out = tmp_path / "big.onnx"
    assert save_onnx(result.model, out, size_threshold=size - 1) == [out, tmp_path / "big.onnx.data"]
    assert save_onnx(result.model, tmp_path / "fits.onnx", size_threshold=size + 1) == [tmp_path / "fits.onnx"]
    reloaded = load_onnx(out)
    for a, b in zip(reloaded.graph.initializer, result.model.graph.initializer):
        assert a.name == b.name and numpy_helper.to_array(a).tobytes() == numpy_helper.to_array(b).tobytes()
    _check(model, reloaded)


def test_external_data_false_still_writes_a_data_file_when_one_protobuf_cannot_hold_the_model(tmp_path):
    result = fold_graph(build(WIDE))
    before = result.model.SerializeToString()
    out = tmp_path / "out.onnx"
    assert save_onnx(result.model, out, external_data=False, size_threshold=4096)[1].name == "out.onnx.data"
    assert result.model.SerializeToString() == before, "save_onnx changed the model"


@pytest.mark.parametrize("location", ["../secret", "/etc/hostname", "sub/../../secret", "link/secret"])
def test_external_data_outside_the_model_folder_is_refused(tmp_path, location):
    folder = tmp_path / "model"
    folder.mkdir()
    (tmp_path / "secret").write_bytes(b"\0" * 1024)
    os.symlink(tmp_path, folder / "link")
    model = build(header() + FOLDS["conv_bias"][0])
    tensor = model.graph.initializer[0]
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    entry = tensor.external_data.add()
    entry.key, entry.value = "location", location
    path = folder / "model.onnx"
    path.write_bytes(model.SerializeToString())
    with pytest.raises(LoadError, match="outside the model's folder"):
        load_onnx(path)


def test_missing_data_file_is_a_load_error(tmp_path):
    source = tmp_path / "model.onnx"
    onnx.save_model(build(WIDE), str(source), save_as_external_data=True, location="weights.bin", size_threshold=0)
    (tmp_path / "weights.bin").unlink()
    with pytest.raises(LoadError, match="'weights.bin', which is missing"):
        load_onnx(source)


def test_verify_onnx_option_with_external_data_outside_its_folder_is_a_load_error(tmp_path):
    """Attack: the --onnx file's Dropout training_mode flag is an external tensor at an absolute path.
    Expected: the same LoadError ``bnfold fuse`` gives ("outside the model's folder"), exit 2. Today the lint
    reads it with onnx's own loader (numpy_helper.to_array(base_dir=...)) and its ValidationError escapes as a
    "please report it" bug."""
    secret = tmp_path / "secret"
    secret.write_bytes(b"\x01")
    model = onnx.parser.parse_model("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N,2] x) => (float[N,2] y) {
        r = Relu (x)
        y = Dropout (r, ratio, flag)
    }""")
    model.graph.initializer.append(numpy_helper.from_array(np.array(0.5, np.float32), "ratio"))
    flag = numpy_helper.from_array(np.array(False), "flag")
    model.graph.initializer.append(flag)
    folder = tmp_path / "m"
    folder.mkdir()
    path = with_external(folder / "m.onnx", str(secret), tensor="flag", model=model)
    from bnfold.verify import verify

    with pytest.raises(LoadError, match="outside"):
        verify(nn.ReLU(), (torch.randn(2, 2),), onnx=path, checks=("onnx",))


@POSIX
@pytest.mark.parametrize("trick", ["dev-zero-link", "fifo", "link-to-fifo", "wrong-length", "offset-past-end",
                                   "negative-offset", "folder"])
def test_external_data_tricks_are_refused_before_anything_is_read(tmp_path, trick):
    """Attack: external data that is a symlink to /dev/zero (endless), a FIFO (a read blocks forever), a link to a
    FIFO, a length that disagrees with the shape, an offset past the end, a negative offset, a folder.
    Expected: LoadError before any data is read; never a hang."""
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "w.bin").write_bytes(np.ones(54, np.float32).tobytes())
    location, offset, length = "w.bin", None, None
    if trick == "dev-zero-link":
        os.symlink("/dev/zero", folder / "zero")
        location = "zero"
    elif trick == "fifo":
        os.mkfifo(folder / "fifo")
        location = "fifo"
    elif trick == "link-to-fifo":
        os.mkfifo(folder / "f")
        os.symlink("f", folder / "lf")
        location = "lf"
    elif trick == "wrong-length":
        length = 12
    elif trick == "offset-past-end":
        offset = 10**30
    elif trick == "negative-offset":
        offset = -4
    elif trick == "folder":
        (folder / "sub").mkdir()
        location = "sub"
    path = with_external(folder / "model.onnx", location, offset=offset, length=length)
    with pytest.raises(LoadError):
        load_onnx(path)


def test_nul_byte_in_a_data_location_is_a_load_error(tmp_path):
    """Attack: an external data location with an embedded NUL byte. Expected: LoadError through bnfold.load."""
    from bnfold.load import load

    path = with_external(tmp_path / "model.onnx", "w\x00.bin")
    with pytest.raises(LoadError):
        load(path)


# -- the written graph passes onnx.checker's full check (README: bnfold fuse model.onnx) ---------------------------
def test_fuse_never_writes_a_graph_that_fails_the_checker(tmp_path):
    """Attack: IR version 2 with an opset_import (invalid: "model with IR version < 3 cannot have opset_import
    specified"), which onnxruntime runs anyway. Expected: refused as an invalid model (exit 2), or a written
    result that passes onnx.checker's full check, as the README promises. Today fuse writes it, exit 0, and
    the output fails the checker (bnfold/onnx/fuse.py never runs the checker; export and verify do)."""
    model = graph()
    model.ir_version = 2
    path = save(model, tmp_path / "ir2.onnx")
    out = tmp_path / "out.onnx"
    result = cli("fuse", str(path), "-o", str(out))
    if result.exit_code == 2:
        assert_clean_error(result)
        assert not out.exists()
        return
    assert result.exit_code == 0, result.output
    onnx.checker.check_model(onnx.load(str(out)), full_check=True)
