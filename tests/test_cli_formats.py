"""`bnfold fuse` on every file format: output format = input format, parity, the input untouched."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from bnfold.cli import main
from bnfold.load import load
from models import zoo
from tests.conftest import sha256

SHAPE = ["--input-shape", "4,1,8,8"]
ARCH = ["--arch", "models.zoo:resnet_digits"]


def run(*args: str):
    return CliRunner().invoke(main, ["fuse", *args], catch_exceptions=False)


def reference_output(x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return zoo.build("resnet_digits")(x)


def assert_same_outputs(path, x):
    loaded = load(path, trust_pickle=True)  # our own output
    model = loaded.model.module() if loaded.format == "export" else loaded.model
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference_output(x), rtol=1e-4, atol=1e-5)
    return loaded


@pytest.fixture
def files(tmp_path, digits_model, in_root):
    state = digits_model.state_dict()
    x = torch.randn(4, 1, 8, 8)
    paths = {
        "state_dict": tmp_path / "plain.pt",
        "nested": tmp_path / "lightning.ckpt",
        "ddp": tmp_path / "ddp.pt",
        "safetensors": tmp_path / "weights.safetensors",
        "torchscript": tmp_path / "scripted.pt",
        "export": tmp_path / "program.pt2",
        "pickle": tmp_path / "whole.pt",
    }
    torch.save(state, paths["state_dict"])
    torch.save({"epoch": 3, "state_dict": {f"model.{k}": v for k, v in state.items()}}, paths["nested"])
    torch.save({"model_state_dict": {f"module.{k}": v for k, v in state.items()}}, paths["ddp"])
    save_file({k: v.contiguous() for k, v in state.items()}, str(paths["safetensors"]))
    torch.jit.save(torch.jit.script(digits_model), str(paths["torchscript"]))
    torch.export.save(torch.export.export(digits_model, (x,)), str(paths["export"]))
    torch.save(digits_model, paths["pickle"])
    return paths


@pytest.mark.parametrize(("kind", "extra", "out_format"), [
    ("state_dict", ARCH + SHAPE, "export"),
    ("nested", ARCH + SHAPE, "export"),
    ("ddp", ARCH + SHAPE, "export"),
    ("safetensors", ARCH + SHAPE, "export"),
    ("torchscript", SHAPE, "torchscript"),
    ("export", [], "export"),  # a .pt2 program carries its input shapes
    ("pickle", SHAPE + ["--trust-pickle"], "pickle"),
])
def test_round_trip(files, tmp_path, kind, extra, out_format):
    src = files[kind]
    digest = sha256(src)
    out = tmp_path / f"out-{kind}"
    report = tmp_path / "report.json"
    result = run(str(src), "-o", str(out), "--json", str(report), *extra)
    assert result.exit_code == 0, result.output
    assert "PASSED" in result.output
    assert sha256(src) == digest  # the input is never modified
    loaded = assert_same_outputs(out, torch.randn(4, 1, 8, 8))
    assert loaded.format == out_format
    doc = json.loads(report.read_text())
    assert doc["schema_version"] == 1 and doc["ok"] is True and doc["output"]["format"] == out_format
    assert len(doc["folded"]) == 9 and doc["skipped"] == []
    assert [c["label"] for c in doc["parity"]] == (["batch 4"] if kind == "export" else ["batch 1", "batch 4"])
    assert not list(tmp_path.glob(".*.tmp*"))  # no temporary file left behind


def test_folded_models_have_no_batchnorm(files, tmp_path):
    out = tmp_path / "p.pt"
    assert run(str(files["pickle"]), "-o", str(out), "--trust-pickle", *SHAPE).exit_code == 0
    model = torch.load(out, weights_only=False)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    out = tmp_path / "e.pt2"
    assert run(str(files["export"]), "-o", str(out)).exit_code == 0
    program = torch.export.load(str(out))
    assert not any("batch_norm" in str(n.target) for n in program.graph.nodes)


def test_keep_structure_state_dict_loads_into_the_same_architecture(files, tmp_path):
    out = tmp_path / "kept.pt"
    result = run(str(files["state_dict"]), "-o", str(out), "--keep-structure", *ARCH, *SHAPE)
    assert result.exit_code == 0, result.output
    model = zoo.resnet_digits()
    model.load_state_dict(torch.load(out, weights_only=True), strict=True)  # existing loading code still works
    model.eval()
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference_output(x), rtol=1e-4, atol=1e-5)
    assert torch.allclose(model.bn1.running_mean, torch.zeros_like(model.bn1.running_mean))


def test_default_output_name_and_json_schema(files, tmp_path):
    result = run(str(files["safetensors"]), *ARCH, *SHAPE, "-q")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "weights.fused.pt2").is_file()
    assert result.output.startswith("PASSED | 9 folded, 0 skipped")


def test_parity_failure_exits_1_and_writes_nothing(files, tmp_path):
    out = tmp_path / "never.pt2"
    report = tmp_path / "r.json"
    # An impossible tolerance: even one rounding fails it.
    result = run(str(files["state_dict"]), "-o", str(out), "--json", str(report), "--atol", "0", "--rtol", "0",
                 *ARCH, *SHAPE)
    assert result.exit_code == 1, result.output
    assert "FAILED" in result.output and "nothing written" in result.output
    assert not out.exists()
    assert json.loads(report.read_text())["ok"] is False
