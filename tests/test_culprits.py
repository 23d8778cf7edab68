"""Which module ``bnfold verify`` blames for a random or batch-dependent eval output: the innermost module whose
own forward (not a child's) makes the call; and the ONNX findings that follow from it are linked to it."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from torch import nn

import bnfold
from bnfold.cli import main

SPECS = [bnfold.InputSpec((4, 1, 8, 8))]


class Head(nn.Module):
    """fc1 -> relu -> ``between`` (in this module's own forward) -> fc2: whatever ``between`` does is ``head``'s."""

    def __init__(self, between) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 8), nn.Linear(8, 4)
        self.between = between

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.between(F.relu(self.fc1(x))))


class Noise(nn.Module):
    """A child module that is random in its own forward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.rand_like(x)


class HeadWithChild(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.noise, self.fc2 = nn.Linear(8, 8), Noise(), nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.noise(self.fc1(x)))


class Net(nn.Module):
    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(1, 8, 3), nn.BatchNorm2d(8)
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


def net(head: nn.Module) -> nn.Module:
    model = Net(head).eval()
    with torch.no_grad():  # learned statistics, so that BN004 stays out of the way
        model.bn.running_mean.uniform_(-0.2, 0.2, generator=torch.Generator().manual_seed(0))
        model.bn.running_var.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(1))
        model.bn.num_batches_tracked.fill_(100)
    return model


def findings(model: nn.Module, *, checks=("audit",)) -> dict[str, list[bnfold.Finding]]:
    report = bnfold.verify(model, SPECS, checks=checks)
    found: dict[str, list[bnfold.Finding]] = {}
    for finding in report.findings:
        found.setdefault(finding.check_name, []).append(finding)
    return found


@pytest.mark.parametrize("between", [
    lambda x: F.dropout(x, 0.5, training=True),
    lambda x: F.dropout(x, 0.5),  # F.dropout's default is training=True
    lambda x: x + torch.randn_like(x),  # no dropout: found where the two runs first part
], ids=["dropout-training-true", "dropout-default", "randn"])
def test_randomness_in_a_parents_own_forward_blames_the_parent(between):
    found = findings(net(Head(between)))
    assert [(f.code, f.module) for f in found["determinism"]] == [("BN007", "head")]


def test_randomness_in_a_childs_forward_blames_the_child():
    found = findings(net(HeadWithChild()))
    assert [(f.code, f.module) for f in found["determinism"]] == [("BN007", "head.noise")]


def test_batch_dependence_in_a_parents_own_forward_blames_the_parent():
    """``x - x.mean(0)`` between fc1 and fc2: fc2's input already differs, so fc2 is not the culprit."""
    found = findings(net(Head(lambda x: x - x.mean(0, keepdim=True))))
    assert [(f.code, f.module) for f in found["batch independence"]] == [("BN002", "head")]


def test_onnx_findings_of_the_same_dropout_are_linked_to_it(tmp_path):
    model = net(Head(lambda x: F.dropout(x, 0.5)))
    found = findings(model, checks=("audit", "onnx"))
    assert [(f.code, f.module) for f in found["determinism"]] == [("BN007", "head")]
    onnx_side = found["onnx lint"] + found["onnx parity"] + found["onnx determinism"]
    assert {f.code for f in onnx_side} == {"BN009", "BN010", "BN007"}
    assert all(f.caused_by == "BN007 in head" for f in onnx_side), [str(f) for f in onnx_side]
    assert all(f.to_dict()["caused_by"] == "BN007 in head" and str(f).endswith("; caused by BN007 in head")
               for f in onnx_side)
    assert found["determinism"][0].caused_by is None


def dropout_net() -> nn.Module:
    """``--arch tests.test_culprits:dropout_net``: a head that calls F.dropout in its own forward."""
    return net(Head(Dropout()))


class Dropout(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.dropout(x, 0.5)


def test_links_reach_the_json_and_the_terminal(tmp_path, in_root):
    path = tmp_path / "model.pt"
    torch.save(dropout_net().state_dict(), path)
    report = tmp_path / "verify.json"
    result = CliRunner().invoke(main, ["verify", str(path), "--trust", "--arch", "tests.test_culprits:dropout_net",
                                       "--input-shape", "4,1,8,8", "--skip", "fold", "--json", str(report)])
    assert result.exit_code == 1, result.output
    assert "caused by BN007 in head" in result.output
    document = json.loads(report.read_text())
    assert [f["module"] for f in document["findings"] if f["code"] == "BN007" and f["check"] == "determinism"] == [
        "head.between"]
    linked = [f for f in document["findings"] if f["caused_by"]]
    assert {f["check"] for f in linked} == {"onnx lint", "onnx parity", "onnx determinism"}
    assert {f["caused_by"] for f in linked} == {"BN007 in head.between"}


def test_an_onnx_finding_without_a_cause_in_pytorch_is_not_linked():
    """A BN left unfolded in the exported graph (BN011, a warning) follows from nothing the eval model does."""
    found = findings(net(Head(nn.Identity())), checks=("audit", "onnx"))
    assert "determinism" not in found
    assert all(f.caused_by is None for fs in found.values() for f in fs)
