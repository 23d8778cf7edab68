"""`bnfold verify` on the command line: exit codes, JSON schema, JUnit XML, GitHub annotations, config."""

from __future__ import annotations

import json
from xml.etree import ElementTree as ET

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from bnfold.cli import main
from models.zoo import randomize_bn_statistics

SHAPE = ["--input-shape", "4,3,8,8"]


def run(*args: str):
    return CliRunner().invoke(main, ["verify", *args])


def _net(trained: bool) -> nn.Module:
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                          nn.Linear(4 * 8 * 8, 3))
    if trained:
        randomize_bn_statistics(model, torch.Generator().manual_seed(0))
    return model.eval()


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
