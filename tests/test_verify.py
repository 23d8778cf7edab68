"""bnfold.verify: for every finding code a model that triggers it and a correct one that must not; the registry of
checks and codes."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import onnx.parser
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper
from torch import nn

import bnfold
from bnfold.findings import CHECKS, CODES
from bnfold.inputs import InputSpec
from bnfold.onnx.lint import lint
from bnfold.testing import assert_deployable
from models import zoo
from models.zoo import randomize_bn_statistics
from tests.nets import X, nonfinite_models

AUDIT = ("audit",)


def trained(model: nn.Module) -> nn.Module:
    randomize_bn_statistics(model, torch.Generator().manual_seed(1))
    return model.eval()


def codes(report) -> set[str]:
    return {f.code for f in report.findings}


class Net(nn.Module):
    """conv -> BN -> ReLU -> pool -> linear; subclasses change one thing each."""

    def __init__(self, bn: nn.Module | None = None) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = bn if bn is not None else nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(F.relu(self.bn(self.conv(x))).mean((2, 3)))


class TrainOverride(Net):
    """BN001: train()/eval() override puts the BN back into training."""

    def train(self, mode: bool = True):
        super().train(mode)
        self.bn.train()
        return self


class FlipsOnFirstCall(Net):
    """BN001: forward flips `training` only during the first call."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        if self.calls == 1:
            self.bn.training = True
        return super().forward(x)


class HardCodedTraining(Net):
    """BN001: F.batch_norm(..., training=True) hard-coded in a custom forward."""

    def forward(self, x):
        y = F.batch_norm(self.conv(x), self.bn.running_mean.clone(), self.bn.running_var.clone(), self.bn.weight,
                         self.bn.bias, training=True)
        return self.fc(F.relu(y).mean((2, 3)))


class ListHidden(nn.Module):
    """BN001/BN002: a BN in a plain Python list, invisible to eval() and named_modules()."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 4, 3, padding=1), nn.Linear(4, 2)
        self.norms = [nn.BatchNorm2d(4)]

    def forward(self, x):
        return self.fc(F.relu(self.norms[0](self.conv(x))).mean((2, 3)))


class BatchCentering(Net):
    """BN002 by design: subtracts the batch mean in eval too (not a BN at all)."""

    def forward(self, x):
        y = self.conv(x)
        return self.fc(F.relu(self.bn(y - y.mean(0, keepdim=True))).mean((2, 3)))


class FunctionalDropout(Net):
    """BN007: F.dropout defaults to training=True."""

    def forward(self, x):
        return self.fc(F.dropout(F.relu(self.bn(self.conv(x))).mean((2, 3)), 0.3))


class ModuleDropout(Net):
    """Clean: nn.Dropout follows eval()."""

    def __init__(self) -> None:
        super().__init__()
        self.drop = nn.Dropout(0.3)

    def forward(self, x):
        return self.fc(self.drop(F.relu(self.bn(self.conv(x))).mean((2, 3))))


class TwoOutputs(Net):
    def forward(self, x):
        y = F.relu(self.bn(self.conv(x)))
        return {"pooled": y.mean((2, 3)), "logits": self.fc(y.mean((2, 3)))}


# -- codes triggered -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(("model", "culprit"), [
    (TrainOverride, "bn"), (FlipsOnFirstCall, "bn"), (ListHidden, "norms[0]"), (HardCodedTraining, ""),
])
def test_bn001_training_mode_at_inference(model, culprit):
    report = bnfold.verify(trained(model()), X, checks=AUDIT)
    assert not report.ok
    found = [f for f in report.findings if f.code == "BN001"]
    assert found and culprit in {f.module for f in found}


def test_bn001_hard_coded_training_names_the_calling_module():
    class Outer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.block = HardCodedTraining()

        def forward(self, x):
            return self.block(x)

    report = bnfold.verify(trained(Outer()), X, checks=AUDIT)
    assert any(f.code == "BN001" and f.module == "block" and "training=True" in f.message for f in report.findings)


@pytest.mark.parametrize(("model", "culprit"), [(TrainOverride, "bn"), (ListHidden, "norms[0]"),
                                                 (BatchCentering, "")])
def test_bn002_batch_dependence_names_the_module(model, culprit):
    report = bnfold.verify(trained(model()), X, checks=AUDIT)
    found = [f for f in report.findings if f.code == "BN002"]
    assert found, report.findings
    assert found[0].module == culprit or (culprit == "" and found[0].module in ("", "bn"))
    assert "companions" in found[0].message


def test_bn002_batch_centering_blames_the_module_whose_forward_centres():
    """``y - y.mean(0)`` is in the model's own forward, between conv and bn: bn's input already depends on the
    batch, so the culprit is the model itself (""), not bn (issue 14: the innermost module whose own forward
    makes the batch-dependent call; before, the first hooked module whose output differed)."""
    report = bnfold.verify(trained(BatchCentering()), X, checks=AUDIT)
    culprit = [f.module for f in report.findings if f.code == "BN002"][0]
    assert culprit == ""


def test_bn003_track_running_stats_false():
    report = bnfold.verify(Net(nn.BatchNorm2d(4, track_running_stats=False)).eval(), X, checks=AUDIT)
    assert "BN003" in codes(report) and "BN002" in codes(report)


def test_bn003_running_mean_none_with_tracking():
    bn = nn.BatchNorm2d(4)
    bn.running_mean = None
    bn.running_var = None
    report = bnfold.verify(Net(bn).eval(), X, checks=AUDIT)
    assert any(f.code == "BN003" and "None" in f.message for f in report.findings)


def test_bn004_statistics_never_learned():
    report = bnfold.verify(Net().eval(), X, checks=AUDIT)
    finding = next(f for f in report.findings if f.code == "BN004")
    assert finding.module == "bn" and "num_batches_tracked=0" in finding.message


@pytest.mark.parametrize(("attr", "value"), [("running_var", float("nan")), ("weight", float("inf"))])
def test_bn005_non_finite(attr, value):
    model = trained(Net())
    with torch.no_grad():
        getattr(model.bn, attr)[1] = value
    report = bnfold.verify(model, X, checks=AUDIT)
    assert any(f.code == "BN005" and f"{attr}[1]" in f.message for f in report.findings)


def test_bn006_degenerate_variance_is_a_warning():
    model = trained(Net())
    with torch.no_grad():
        model.bn.running_var[3] = 1e-9
        model.bn.eps = 1e-10
    report = bnfold.verify(model, X, checks=AUDIT)
    finding = next(f for f in report.findings if f.code == "BN006")
    assert finding.severity == "warning" and "channel 3" in finding.message
    assert report.ok  # a warning alone does not fail


def test_bn007_functional_dropout():
    report = bnfold.verify(trained(FunctionalDropout()), X, checks=AUDIT)
    assert "BN007" in codes(report) and "BN002" not in codes(report)


def test_bn008_fold_parity(monkeypatch):
    # A BN forced into training makes the folded (running-stats) model differ from the eval model.
    report = bnfold.verify(trained(TrainOverride()), X, checks=("fold",))
    finding = next(f for f in report.findings if f.code == "BN008")
    check = next(c for c in report.checks if c.name == "fold parity")
    # a real parity failure with its figures, not "folding raised" (which would also file BN008)
    assert "max abs" in finding.message and "raised" not in finding.message
    assert not check.passed and "folding failed" not in check.detail and "1 folded" in check.detail


def test_bn012_handed_over_in_training_mode():
    report = bnfold.verify(trained(Net()).train(), X, checks=AUDIT)
    assert "BN012" in codes(report) and report.ok


@pytest.mark.parametrize("case", ["inf weight", "zero variance without eps"])
def test_nonfinite_outputs_are_an_error_naming_the_module(case):
    model, culprit = nonfinite_models()[case]
    report = bnfold.verify(model, X, checks=("audit",))
    finding = next(f for f in report.findings if f.code == "BN014")
    assert finding.module == culprit and finding.severity == "error"
    assert not report.ok


# -- ONNX codes ------------------------------------------------------------------------------------------
def test_bn009_training_bn_in_onnx_matches_its_forced_training_model():
    # The model forces its BN into training, so PyTorch's "eval" output uses batch statistics too: onnxruntime
    # agrees with it (no BN010), and the lint files BN009 under the onnx lint check.
    report = bnfold.verify(trained(TrainOverride()), X, checks=("onnx",))
    assert "BN009" in codes(report) and "BN010" not in codes(report)
    lint = next(c for c in report.checks if c.name == "onnx lint")
    assert not lint.passed and not report.ok


def test_bn009_and_bn010_onnx_exported_in_training_mode(tmp_path):
    # A clean model exported in training mode: the graph normalises with batch statistics (BN009), so
    # onnxruntime's output differs from the eval model's (BN010).
    path = tmp_path / "train_mode.onnx"
    model = trained(Net())
    torch.onnx.export(model, X, str(path), dynamo=False, training=torch.onnx.TrainingMode.TRAINING,
                      do_constant_folding=False, input_names=["x"], dynamic_axes={"x": {0: "b"}})
    model.eval()
    report = bnfold.verify(model, X, onnx=path, checks=("onnx",))
    assert {"BN009", "BN010"} <= codes(report)
    failed = {c.name for c in report.checks if not c.passed}
    assert {"onnx lint", "onnx parity"} <= failed


def test_bn010_given_onnx_file_that_does_not_match(tmp_path):
    model = trained(Net())
    other = copy.deepcopy(model)  # the same weights but the last layer's bias: the file is stale there
    with torch.no_grad():
        other.fc.bias += 1.0
    path = tmp_path / "stale.onnx"
    torch.onnx.export(other, X, str(path), dynamo=False, input_names=["x"], dynamic_axes={"x": {0: "b"}})
    report = bnfold.verify(model, X, onnx=path, checks=("onnx",))
    finding = next(f for f in report.findings if f.code == "BN010")
    assert "max abs" in finding.message and "at (" in finding.message
    # the culprit: the first ONNX node and torch module where onnxruntime and PyTorch part
    culprit = next(f for f in report.findings if f.code == "BN010" and f.message.startswith("first divergence"))
    assert culprit.module == "fc" and "Gemm" in culprit.message


def test_bn007_and_bn009_dropout_in_onnx():
    report = bnfold.verify(trained(FunctionalDropout()), X, checks=("onnx",))
    assert {"BN007", "BN009"} <= codes(report)
    assert any(f.code == "BN007" and f.module == "onnx" for f in report.findings)


def test_bn011_foldable_bn_left_in_graph():
    model = trained(nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 5), nn.BatchNorm1d(5)))
    report = bnfold.verify(model, X, checks=("onnx",))
    assert any(f.code == "BN011" and f.severity == "warning" for f in report.findings)
    assert report.ok


# BN011 only for a BN whose weights and statistics are all constants.
def conv_bn(weight_as: str = "initializer", stat_as: str = "initializer") -> onnx.ModelProto:
    """x -> Conv(W, B) -> BatchNormalization(scale, bias, mean, var) -> y.

    ``weight_as`` / ``stat_as`` say where W and the BN's scale come from: an initializer (constant), a graph
    input, an initializer also listed as a graph input (a default a caller can override), or a node's output.
    """
    tensors = {"W": np.full((2, 1, 1, 1), 0.5, np.float32), "B": np.zeros(2, np.float32),
               "scale": np.ones(2, np.float32), "bias": np.zeros(2, np.float32), "mean": np.zeros(2, np.float32),
               "var": np.ones(2, np.float32)}
    nodes = [onnx.helper.make_node("Conv", ["x", "W", "B"], ["c"], name="conv"),
             onnx.helper.make_node("BatchNormalization", ["c", "scale", "bias", "mean", "var"], ["y"], name="bn")]
    inputs = [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 1, 2, 2])]
    initializers = dict(tensors)
    for name, where in (("W", weight_as), ("scale", stat_as)):
        info = onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, tensors[name].shape)
        if where == "graph input":
            del initializers[name]
            inputs.append(info)
        elif where == "overridable initializer":
            inputs.append(info)
        elif where == "node output":  # computed from a graph input too (from constants alone it would fold)
            initializers[f"{name}_source"] = initializers.pop(name)
            inputs.append(onnx.helper.make_tensor_value_info(f"{name}_delta", onnx.TensorProto.FLOAT,
                                                             tensors[name].shape))
            nodes.insert(0, onnx.helper.make_node("Add", [f"{name}_source", f"{name}_delta"], [name]))
    graph = onnx.helper.make_graph(nodes, "conv_bn", inputs,
                                   [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 2, 2, 2])],
                                   [onnx.numpy_helper.from_array(v, k) for k, v in initializers.items()])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 15)])
    onnx.checker.check_model(model)
    return model


def test_bn011_constant_weights_and_statistics_fold():
    findings = lint(conv_bn())
    assert [(f.code, f.module) for f in findings] == [("BN011", "bn")]
    assert "follows conv and could be folded" in findings[0].message


@pytest.mark.parametrize("weight_as, stat_as", [
    ("graph input", "initializer"),
    ("overridable initializer", "initializer"),
    ("node output", "initializer"),
    ("initializer", "graph input"),
    ("initializer", "overridable initializer"),
    ("initializer", "node output"),
])
def test_bn011_not_for_a_weight_or_statistic_that_can_change(weight_as, stat_as):
    assert lint(conv_bn(weight_as, stat_as)) == []


def test_bn011_not_for_a_gemm_whose_bias_is_a_graph_input():
    model = onnx.parser.parse_model("""
    <ir_version: 8, opset_import: ["" : 15]>
    g (float[1, 2] x, float[2] C) => (float[1, 2] y) <float[2, 2] B = {1, 0, 0, 1}, float[2] s = {1, 1},
                                                     float[2] b = {0, 0}, float[2] m = {0, 0}, float[2] v = {1, 1}> {
        h = Gemm (x, B, C)
        y = BatchNormalization (h, s, b, m, v)
    }""")
    assert lint(model) == []


def _onnx_graph(path, training_mode: int) -> None:
    c = 2
    inits = [helper.make_tensor(n, TensorProto.FLOAT, [c], v) for n, v in
             [("scale", [1.0, 1.0]), ("bias", [0.0, 0.0]), ("mean", [0.0, 0.0]), ("var", [1.0, 1.0])]]
    outputs = ["y", "rm", "rv"] if training_mode else ["y"]
    node = helper.make_node("BatchNormalization", ["x", "scale", "bias", "mean", "var"], outputs, name="bn",
                            training_mode=training_mode)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, c, 3, 3])],
                              [helper.make_tensor_value_info(o, TensorProto.FLOAT, [4, c, 3, 3] if o == "y" else [c])
                               for o in outputs], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)]), str(path))


def test_onnx_only_graph_checks(tmp_path):
    bad, good = tmp_path / "train.onnx", tmp_path / "eval.onnx"
    _onnx_graph(bad, 1)
    _onnx_graph(good, 0)
    report = bnfold.verify(str(bad))
    assert not report.ok and any(f.code == "BN009" and f.module == "bn" for f in report.findings)
    assert bnfold.verify(str(good))


# -- must not trigger --------------------------------------------------------------------------------------
@pytest.mark.parametrize("model", [
    lambda: Net(nn.BatchNorm2d(4, momentum=None)),
    lambda: Net(nn.BatchNorm2d(4, affine=False)),
    lambda: Net(nn.InstanceNorm2d(4)),
    lambda: Net(nn.GroupNorm(2, 4)),
    ModuleDropout,
    TwoOutputs,
], ids=["momentum-none", "affine-false", "instancenorm", "groupnorm", "module-dropout", "dict-outputs"])
def test_correct_models_verify_clean(model):
    report = bnfold.verify(trained(model()), X)
    assert report.ok, [str(f) for f in report.findings] + [c.detail for c in report.checks if not c.passed]
    assert not report.errors


@pytest.mark.parametrize("name", sorted(zoo.REFERENCE_MODELS))
def test_reference_models_verify_clean(name):
    spec = zoo.REFERENCE_MODELS[name]
    report = bnfold.verify(zoo.build(name), [InputSpec(tuple(spec.input_shape))])  # seeded draws: deterministic
    assert report.ok, [str(f) for f in report.findings] + [c.detail for c in report.checks if not c.passed]
    assert {f.code for f in report.findings} <= {"BN011"}  # warnings only: the exporter left a BN unfolded


def test_traced_export_of_a_data_dependent_branch_is_caught():
    # The exporter traces the batch-1 case; when the whole batch takes the model's other branch (the sign of
    # the batch mean), onnxruntime runs the traced branch only: BN010, with the user's own tensors.
    spec = zoo.REFERENCE_MODELS["untraceable_tiny"]
    x = torch.randn(spec.input_shape, generator=torch.Generator().manual_seed(0)).abs() * -1.0
    x[0] = x[0].abs()  # sample 0 alone: mean > 0; the batch: mean < 0
    report = bnfold.verify(zoo.build("untraceable_tiny"), (x,), checks=("onnx",))
    assert "BN010" in {f.code for f in report.findings}
    assert not next(c for c in report.checks if c.name == "onnx parity").passed


def test_report_api_and_assert_deployable():
    report = assert_deployable(trained(Net()), X)
    assert report and report.ok and report.findings == []
    assert {c.name for c in report.checks} >= {"statistics", "mode", "batch independence", "batch 1",
                                                "determinism", "fold parity", "onnx parity"}
    with pytest.raises(AssertionError, match="BN004"):
        assert_deployable(Net().eval(), X, checks=AUDIT)


def test_disable_and_nothing_checked():
    report = bnfold.verify(Net().eval(), X, checks=AUDIT, disable=("BN004",))
    assert "BN004" not in codes(report)
    assert not bnfold.verify(trained(Net()), X, checks=())  # a run that checked nothing fails
    with pytest.raises(bnfold.BnfoldError, match="BN999"):
        bnfold.verify(Net(), X, disable=("BN999",))


def test_every_code_is_documented():
    readme = (__import__("pathlib").Path(__file__).parents[1] / "README.md").read_text()
    for code in CODES:
        assert f"| {code} |" in readme


def test_every_code_belongs_to_a_check():
    listed = {code for check in CHECKS for code in check.codes}
    assert listed == set(CODES)


def test_onnxruntime_crash_becomes_a_finding(tmp_path, monkeypatch):
    """A segfault inside onnxruntime must end as BN010, not as a dead CI job."""
    crasher = tmp_path / "crash.py"
    crasher.write_text("import os, signal, sys\nprint('ready', flush=True)\nsys.stdin.readline()\n"
                       "os.kill(os.getpid(), signal.SIGSEGV)\n")
    monkeypatch.setattr("bnfold.onnx.runner._WORKER", crasher)
    report = bnfold.verify(trained(Net()), X, checks=("onnx",))
    finding = next(f for f in report.findings if f.code == "BN010")
    assert "killed by signal 11" in finding.message
    assert not report.ok
