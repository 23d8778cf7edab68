"""Hostile use of the command line: configs, path clashes, tolerances, non-finite models, damaged files,
report consistency. Each test reproduces a hole found by an adversarial pass (issue: harden every input)."""

from __future__ import annotations

import os
import shutil
from xml.etree import ElementTree as ET

import pytest
import torch
from click.testing import CliRunner
from conftest import sha256
from torch import nn

import bnfold
from bnfold.cli import main
from bnfold.findings import CHECKS, CODES
from models.zoo import randomize_bn_statistics

SHAPE = ["--input-shape", "4,3,8,8"]
X = (torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0)),)


def cli(*args: str):
    return CliRunner().invoke(main, list(args))


def assert_usage_error(result, *fragments: str) -> None:
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error: ") and "Traceback" not in result.output
    assert "please report" not in result.output
    for fragment in fragments:
        assert fragment in result.output, result.output


def net() -> nn.Module:
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                          nn.Linear(4 * 8 * 8, 3))
    randomize_bn_statistics(model, torch.Generator().manual_seed(0))
    return model.eval()


@pytest.fixture(scope="module")
def program(tmp_path_factory):
    path = tmp_path_factory.mktemp("program") / "good.pt2"
    torch.export.save(torch.export.export(net(), X), str(path))
    return path


# -- config: typed, no code without --trust, resolved against its own folder ---------------------------------
def write_config(folder, body: str):
    (folder / "pyproject.toml").write_text(body)
    return folder / "pyproject.toml"


@pytest.mark.parametrize("line, fragments", [
    ('trust-pickle = "false"', ["trust-pickle", "--trust"]),
    ("trust = true", ["not allowed in the config", "--trust"]),
    ('disable = "BN011"', ["disable must be a list of strings", "'BN011'"]),
    ('checks = ["audti"]', ["checks", "did you mean 'audit'"]),
    ("chekcs = []", ["unknown key 'chekcs'", "did you mean 'checks'"]),
    ("atol = nan", ["atol must be a finite number >= 0"]),
    ("rtol = -1.0", ["rtol must be a finite number >= 0"]),
    ('seed = "1"', ["seed must be an integer"]),
    ("timeout = 0", ["timeout must be a number > 0"]),
    ('exporter = "onnx"', ["exporter must be one of"]),
    ('input-shapes = ["1,3,x"]', ["input-shapes"]),
])
def test_config_values_are_checked_by_type(tmp_path, program, monkeypatch, line, fragments):
    shutil.copy(program, tmp_path / "m.pt2")
    write_config(tmp_path, f'[[tool.bnfold.models]]\npath = "m.pt2"\n{line}\n')
    monkeypatch.chdir(tmp_path)
    assert_usage_error(cli("verify", "--skip", "onnx"), *fragments)


def test_models_written_as_a_table(tmp_path, monkeypatch):
    write_config(tmp_path, '[tool.bnfold.models]\npath = "m.pt2"\n')
    monkeypatch.chdir(tmp_path)
    assert_usage_error(cli("verify"), "single table", "[[tool.bnfold.models]]")


def test_config_named_code_needs_trust_and_resolves_against_the_config_folder(tmp_path, monkeypatch):
    project = tmp_path / "project"
    (project / "nets").mkdir(parents=True)
    marker = tmp_path / "imported"
    (project / "nets" / "__init__.py").write_text("")
    (project / "nets" / "tiny_hardening.py").write_text(
        f"import pathlib, torch\npathlib.Path({str(marker)!r}).touch()\n"
        "def build():\n"
        "    m = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))\n"
        "    m[1].running_var.fill_(2.0); m[1].running_mean.fill_(0.5); m[1].num_batches_tracked.fill_(3)\n"
        "    return m\n")
    state = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)).state_dict()
    state["1.running_var"].fill_(2.0)
    state["1.num_batches_tracked"].fill_(3)
    torch.save(state, project / "sd.pt")
    write_config(project, '[[tool.bnfold.models]]\npath = "sd.pt"\narch = "nets.tiny_hardening:build"\n'
                          'input-shapes = ["2,3,8,8"]\n')
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # arch must resolve against the config's folder, not the current one
    config = str(project / "pyproject.toml")
    assert_usage_error(cli("verify", "--config", config, "--skip", "onnx"), "names code", "--trust")
    assert not marker.exists()
    result = cli("verify", "--config", config, "--skip", "onnx", "--trust")
    assert result.exit_code == 0, result.output
    assert marker.exists()


def test_config_path_that_is_a_folder(tmp_path, monkeypatch):
    (tmp_path / "dir.pt2").mkdir()
    write_config(tmp_path, '[[tool.bnfold.models]]\npath = "dir.pt2"\n')
    monkeypatch.chdir(tmp_path)
    assert_usage_error(cli("verify"), "not a regular file")


# -- outputs never overwrite inputs or each other ---------------------------------------------------------
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
    result = cli("recalibrate", str(model), "--arch", "tests.test_hardening_cli:net", "--data", str(data),
                 "-o", str(data))
    assert_usage_error(result, "--data")
    assert sha256(data) == before


# -- tolerances --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("flag, value", [("--atol", "nan"), ("--rtol", "nan"), ("--atol", "inf"),
                                         ("--rtol", "-1e-3")])
def test_tolerances_must_be_finite_and_non_negative(program, flag, value):
    assert_usage_error(cli("fuse", str(program), flag, value, "-o", os.devnull + ".never"), flag)
    assert_usage_error(cli("verify", str(program), flag, value), flag)


# -- non-finite is never a pass -----------------------------------------------------------------------------
def nonfinite_models():
    inf_weight = net()
    with torch.no_grad():
        inf_weight[0].weight[0, 0, 0, 0] = float("inf")
    zero_var = net()
    zero_var[1].running_var[1] = 0.0
    zero_var[1].eps = 0.0
    with torch.no_grad():
        zero_var[1].running_mean[1] = 0.0
        zero_var[0].bias[1] = 1.0  # the channel's input is never exactly the mean: (x - 0) / 0 = inf
    return {"inf weight": (inf_weight, "0"), "zero variance without eps": (zero_var, "1")}


@pytest.mark.parametrize("case", ["inf weight", "zero variance without eps"])
def test_nonfinite_outputs_are_an_error_naming_the_module(case):
    model, culprit = nonfinite_models()[case]
    report = bnfold.verify(model, X, checks=("audit",))
    finding = next(f for f in report.findings if f.code == "BN014")
    assert finding.module == culprit and finding.severity == "error"
    assert not report.ok


def test_fuse_of_a_nan_model_fails(tmp_path):
    model, _ = nonfinite_models()["inf weight"]
    result = bnfold.fuse(model, X)
    assert not result.ok


# -- damaged files: one precise line ------------------------------------------------------------------------
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


def test_missing_onnx_file(program, tmp_path):
    assert_usage_error(cli("verify", str(program), "--onnx", str(tmp_path / "missing.onnx")), "no such file")


# -- what is printed -----------------------------------------------------------------------------------------
def test_file_names_are_printed_as_they_are(tmp_path, program):
    odd = tmp_path / "a:x:[bold]b.pt2"
    shutil.copy(program, odd)
    result = cli("fuse", str(odd), "-o", str(tmp_path / "out.pt2"))
    assert result.exit_code == 0, result.output
    assert "a:x:[bold]b.pt2" in result.output and "\u274c" not in result.output


def test_help_names_every_code():
    result = cli("verify", "--help")
    assert f"BN001-{max(CODES)}" in result.output


# -- report consistency: one registry of checks ----------------------------------------------------------------
def test_every_code_belongs_to_a_check():
    listed = {code for check in CHECKS for code in check.codes}
    assert listed == set(CODES)


def test_onnx_only_junit_agrees_with_the_exit_code(tmp_path):
    model = net()
    path = tmp_path / "train.onnx"
    torch.onnx.export(model, X, str(path), dynamo=False, training=torch.onnx.TrainingMode.TRAINING,
                      do_constant_folding=False, input_names=["x"], dynamic_axes={"x": {0: "b"}})
    junit = tmp_path / "r.xml"
    result = cli("verify", str(path), "--junit", str(junit))
    assert result.exit_code == 1, result.output
    suite = ET.parse(junit).getroot().find("testsuite")
    assert int(suite.get("failures")) >= 1
    failed_cases = {c.get("name") for c in suite.iter("testcase") if c.find("failure") is not None}
    assert "onnx lint" in failed_cases
    report = bnfold.verify(str(path))
    names = {c.name for c in report.checks}
    assert all(f.check_name in names for f in report.findings)
