"""scripts/train.py end to end on a tiny budget (a few optimiser steps), with the network switched off."""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import socket
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from models import zoo

ROOT = Path(__file__).resolve().parents[1]


def _load_train_script():
    """scripts/ is not a package: load scripts/train.py under a private module name (no sys.path change)."""
    name = "_bnfold_scripts_train"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / "train.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look the module up while the class is created
        spec.loader.exec_module(module)
    return sys.modules[name]


train_script = _load_train_script()


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any attempt to open a connection fails: the digits dataset ships with scikit-learn."""

    def refuse(*args, **kwargs):
        raise OSError("network access is disabled in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def read_metrics(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_tiny_training_run_writes_checkpoint_metrics_and_summary(tmp_path):
    deterministic_before = torch.are_deterministic_algorithms_enabled()
    config = train_script.TrainConfig(model="resnet_digits", epochs=2, batch_size=32, lr=0.05, max_steps=4, seed=3,
                                      out=str(tmp_path / "run"), progress=False)
    result = train_script.train(config)
    assert torch.are_deterministic_algorithms_enabled() == deterministic_before  # global setting restored

    run = tmp_path / "run"
    state = load_file(str(run / "checkpoint.safetensors"))
    model = zoo.resnet_digits()
    model.load_state_dict(state, strict=True)  # keys exactly as the zoo builds them
    assert set(state) == set(model.state_dict())

    rows = read_metrics(run / "metrics.csv")
    assert list(rows[0]) == ["epoch", "train_loss", "train_acc", "test_acc_eval", "lr"]
    assert len(rows) == 1  # 4 steps fit in the first epoch (45 batches of 32)
    for row in rows:
        assert math.isfinite(float(row["train_loss"])) and float(row["train_loss"]) > 0
        assert 0.0 <= float(row["test_acc_eval"]) <= 1.0
        assert float(row["lr"]) == pytest.approx(0.05)

    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 4
    assert summary["diverged"] is False and summary["nonfinite_loss"] is False
    assert math.isfinite(summary["initial_loss"]) and math.isfinite(summary["final_train_loss"])
    assert summary["train_samples"] + summary["test_samples"] == 1797
    assert summary["torch_version"] == torch.__version__

    # the same configuration again gives bit-identical weights (seeded init, seeded batch order)
    again = train_script.train(train_script.TrainConfig(**{**config.__dict__, "out": None}))
    for key, value in result["model"].state_dict().items():
        assert torch.equal(value, again["model"].state_dict()[key]), key


def test_cli_no_bn_cumulative_momentum_and_export(tmp_path):
    out = tmp_path / "cli"
    export = tmp_path / "bundle" / "digits.safetensors"
    code = train_script.main(["--epochs", "1", "--max-steps", "2", "--batch-size", "16", "--bn-momentum", "none",
                              "--out", str(out), "--export", str(export), "--no-progress"])
    assert code == 0
    state = load_file(str(export))
    model = zoo.resnet_digits()
    model.load_state_dict(state, strict=True)
    assert json.loads((out / "summary.json").read_text())["config"]["bn_momentum"] is None  # cumulative average
    meta = json.loads(export.with_suffix(".json").read_text())
    assert {"test_accuracy", "seed", "epochs", "dataset", "date", "torch_version"} <= set(meta)
    assert math.isfinite(float(read_metrics(out / "metrics.csv")[-1]["train_loss"]))

    code = train_script.main(["--epochs", "1", "--max-steps", "2", "--no-bn", "--out", str(tmp_path / "nobn"),
                              "--no-progress"])
    assert code == 0
    state = load_file(str(tmp_path / "nobn" / "checkpoint.safetensors"))
    assert not any("running_mean" in k for k in state)  # every BatchNorm replaced by nn.Identity
    assert math.isfinite(float(read_metrics(tmp_path / "nobn" / "metrics.csv")[-1]["train_loss"]))
