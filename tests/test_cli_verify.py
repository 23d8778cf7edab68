"""`bnfold verify` on the command line: exit codes, JSON schema, JUnit XML, GitHub annotations, config."""

from __future__ import annotations

import json
import shutil
from xml.etree import ElementTree as ET

import pytest
import torch
from click.testing import CliRunner

import bnfold
from bnfold.cli import main
from tests.cli_helpers import assert_usage_error, cli
from tests.nets import X, _net, net

SHAPE = ["--input-shape", "4,3,8,8"]


def run(*args: str):
    return CliRunner().invoke(main, ["verify", *args])


@pytest.fixture
def programs(tmp_path):
    x = (torch.randn(4, 3, 8, 8),)
    good, stale = tmp_path / "good.pt2", tmp_path / "stale.pt2"
    torch.export.save(torch.export.export(_net(True), x), str(good))
    torch.export.save(torch.export.export(_net(False), x), str(stale))  # statistics never learned: BN004
    return good, stale


def test_clean_model_exits_0_with_reports(programs, tmp_path):
    good, _ = programs
    report, junit = tmp_path / "v.json", tmp_path / "v.xml"
    result = run(str(good), "--json", str(report), "--junit", str(junit), "--timings")
    assert result.exit_code == 0, result.output
    assert "PASSED | 1 model(s), 0 error(s)" in result.output and "onnxruntime" in result.output
    doc = json.loads(report.read_text())
    assert doc["schema_version"] == 1 and doc["command"] == "verify" and doc["ok"] is True
    assert doc["findings"] == []
    assert {c["name"] for c in doc["checks"]} >= {"mode", "batch independence", "fold parity", "onnx parity"}
    model = doc["models"][0]
    assert set(model) >= {"model", "ok", "findings", "checks", "parity", "timings"}
    assert {"load", "audit", "fold", "export", "onnxruntime", "total"} <= set(model["timings"])
    assert all({"max_abs", "max_rel", "worst_index", "required_rtol"} <= set(o) for p in model["parity"]
               for o in p["outputs"])
    suites = ET.parse(junit).getroot()
    assert suites.tag == "testsuites"
    cases = suites.findall("./testsuite/testcase")
    assert len(cases) == len(doc["checks"]) and not suites.findall(".//failure")


def test_error_findings_exit_1_with_failures_and_annotations(programs, tmp_path):
    _, stale = programs
    junit = tmp_path / "v.xml"
    result = run(str(stale), "--junit", str(junit), "--format", "github")
    assert result.exit_code == 1, result.output
    assert "BN004" in result.output and "::error title=BN004::" in result.output
    failures = ET.parse(junit).getroot().findall(".//testcase[@name='statistics']/failure")
    assert failures and "BN004" in failures[0].text


def test_disable_turns_a_failure_into_a_pass(programs):
    _, stale = programs
    assert run(str(stale), "--disable", "BN004", "--skip", "onnx").exit_code == 0


def test_could_not_run_exits_2(tmp_path):
    result = run(str(tmp_path / "missing.pt"), *SHAPE)
    assert result.exit_code == 2 and result.output.startswith("error: ") and "Traceback" not in result.output
    assert run(str(tmp_path / "missing.pt"), "--disable", "BN999").exit_code == 2


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


def test_config_in_pyproject(tmp_path, programs, monkeypatch):
    good, stale = programs
    (tmp_path / "pyproject.toml").write_text(f"""
[tool.bnfold]
checks = ["audit", "fold"]

[[tool.bnfold.models]]
name = "good"
path = "{good.name}"

[[tool.bnfold.models]]
name = "stale"
path = "{stale.name}"
disable = ["BN004"]
""")
    monkeypatch.chdir(tmp_path)
    result = run()
    assert result.exit_code == 0, result.output
    assert "PASSED | 2 model(s)" in result.output
    (tmp_path / "pyproject.toml").write_text("[tool.bnfold]\n[[tool.bnfold.models]]\nname = 'x'\n")
    result = run()
    assert result.exit_code == 2 and "'path' is missing" in result.output
    (tmp_path / "pyproject.toml").write_text("[project]\nname = 'x'\n")
    result = run()
    assert result.exit_code == 2 and "no [[tool.bnfold.models]]" in result.output


def test_repository_config_verifies_the_bundled_model(in_root):
    refused = run("--skip", "onnx")  # the config names code (arch): it runs only when the command line trusts it
    assert refused.exit_code == 2 and "--trust" in refused.output and "Traceback" not in refused.output
    result = run("--skip", "onnx", "--trust")
    assert result.exit_code == 0, result.output
    assert "resnet_digits (bundled)" in result.output


# -- config: typed, no code without --trust, resolved against its own folder ---------------------------------------
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
