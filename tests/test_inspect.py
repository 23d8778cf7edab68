"""bnfold inspect: the plan is fuse's, the figures are right, planted risks are flagged, nothing is judged."""

from __future__ import annotations

import json
import sys

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file
from torch import nn

import bnfold
from bnfold.cli import main
from bnfold.inspect import FLAGS, figures, inspect
from bnfold.load import load
from models import zoo
from tests.onnx_graphs import build as build_onnx

SHAPE = ["--input-shape", "4,1,8,8"]
ARCH = ["--arch", "models.zoo:resnet_digits"]
ROW_KEYS = {"name", "producer", "consumers", "status", "layer", "layer_kind", "position", "merged_with", "plan",
            "reason", "channels", "eps", "momentum", "num_batches_tracked", "running_mean_min", "running_mean_max",
            "running_var_min", "running_var_max", "gamma_min", "gamma_max", "magnification_min", "magnification_max",
            "magnification_channel", "dead_channels", "flags", "drift", "note"}
DOC_KEYS = {"schema_version", "command", "input", "kind", "discovery", "summary", "flags", "bns", "drift", "notes"}


def run(*args: str):
    return CliRunner().invoke(main, ["inspect", *args])


def example(name: str) -> tuple[torch.Tensor, ...]:
    return (torch.randn(zoo.REFERENCE_MODELS[name].input_shape, generator=torch.Generator().manual_seed(0)),)


def plan_of_rows(rows) -> tuple[set, dict]:
    """(folds as (bn, layer, position), {bn: reason}) from inspect's rows or its JSON objects."""
    folds, left = set(), {}
    for row in rows:
        row = row if isinstance(row, dict) else row.to_dict()
        if row["status"] == "folds":
            folds.add((row["name"], row["layer"], row["position"]))
        else:
            left[row["name"]] = row["reason"]
    return folds, left


def plan_of_fuse(result) -> tuple[set, dict]:
    return {(f.bn.name, f.layer.name, f.position) for f in result.folded}, {s.bn: s.reason for s in result.skipped}


def flagged(report) -> dict[str, list[str]]:
    return {r.name: r.flags for r in report.rows if r.flags}


# -- the plan is fuse's, on every reference model ------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(zoo.REFERENCE_MODELS))
def test_reference_model_plan_is_fuses(name):
    model, x = zoo.build(name), example(name)
    report = inspect(model, x)
    assert plan_of_rows(report.rows) == plan_of_fuse(bnfold.fuse(model, x))
    names = [r.name for r in report.rows]
    assert len(names) == len(set(names))
    summary = report.summary
    assert summary.bns == len(report.rows) and summary.foldable + sum(summary.left.values()) == summary.bns
    # Reference models carry learned-looking statistics: nothing to flag.
    assert flagged(report) == {} and summary.risky == 0
    for row in report.rows:
        assert row.figures is not None, row.name
        assert row.producer is not None, row.name


def test_rows_follow_the_forward_order_and_name_neighbours():
    report = inspect(zoo.build("special_tiny"), example("special_tiny"))
    assert [r.name for r in report.rows] == ["fbn", "bn_b", "bn_c", "bn_d", "bn_e", "bn_f", "bn_g"]
    rows = {r.name: r for r in report.rows}
    assert (rows["bn_b"].producer, rows["bn_b"].consumers) == ("conv_b", ["relu_b"])
    assert (rows["bn_d"].producer, rows["bn_d"].consumers) == ("relu_c", ["conv_d"])  # folds forward, into conv_d
    assert rows["bn_e"].fold is None and "padded conv conv_e" in rows["bn_e"].reason
    assert rows["bn_b"].momentum == 0.1 and rows["bn_b"].num_batches_tracked == 100
    assert rows["fbn"].momentum is None  # F.batch_norm in forward: not a module
    assert rows["bn_b"].figures.gamma_min is None  # affine=False


def test_observed_discovery_fills_the_rows_too():
    report = inspect(zoo.build("untraceable_tiny"), example("untraceable_tiny"))
    assert report.discovery == "observed"
    assert all(r.producer is not None and r.figures is not None for r in report.rows)


def test_arithmetic_bn_in_a_compiled_graph_has_a_row_without_figures():
    model, x = zoo.build("bnact_tiny"), example("bnact_tiny")
    scripted = torch.jit.script(model)
    report = inspect(scripted, x)
    assert plan_of_rows(report.rows) == plan_of_fuse(bnfold.fuse(scripted, x))
    rows = {r.name: r for r in report.rows}
    assert rows["bn3"].figures is None and "plain arithmetic" in rows["bn3"].reason  # FrozenBatchNorm2d
    assert "statistics not read" in rows["bn3"].note
    assert rows["bn1"].figures is not None and rows["bn1"].num_batches_tracked == 100


def test_a_layer_absorbing_two_bns_merges_them():
    model = nn.Sequential(nn.BatchNorm1d(4), nn.Linear(4, 3), nn.BatchNorm1d(3)).eval()
    rows = {r.name: r for r in inspect(model, (torch.randn(5, 4),)).rows}
    assert (rows["0"].fold.layer.name, rows["0"].fold.position, rows["0"].merged_with) == ("1", "before", ["2"])
    assert (rows["2"].fold.layer.name, rows["2"].fold.position, rows["2"].merged_with) == ("1", "after", ["0"])


def test_the_report_has_no_verdict():
    report = inspect(zoo.build("mlp_tiny"), example("mlp_tiny"))
    with pytest.raises(TypeError, match="no verdict"):
        bool(report)


# -- figures: closed form --------------------------------------------------------------------------------------------
def test_figures_in_closed_form():
    mean = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float16)
    var = torch.tensor([4.0, 0.25, 1.0], dtype=torch.float16)
    gamma = torch.tensor([2.0, 0.0, -3.0], dtype=torch.float16)
    fig = figures(mean, var, 0.0, gamma)
    assert (fig.channels, fig.mean_min, fig.mean_max, fig.var_min, fig.var_max) == (3, -1.0, 2.0, 0.25, 4.0)
    assert (fig.gamma_min, fig.gamma_max, fig.dead_channels) == (-3.0, 2.0, 1)
    assert (fig.magnification_max, fig.magnification_channel, fig.magnification_min) == (3.0, 2, 1.0)  # dead: not min
    assert fig.finite and not fig.untouched
    no_affine = figures(torch.zeros(2), torch.ones(2), 0.0)
    assert no_affine.untouched and no_affine.gamma_min is None and no_affine.magnification_max == 1.0


# -- planted risks -----------------------------------------------------------------------------------------------------
def planted(change):
    model = zoo.build("special_tiny")
    with torch.no_grad():
        change(model)
    return inspect(model, example("special_tiny"))


def test_tiny_variance_is_flagged_with_its_channel():
    def tiny(model):
        model.bn_c.running_var[3] = 1e-9
        model.bn_c.eps = 1e-10

    report = planted(tiny)
    assert flagged(report) == {"bn_c": ["magnification"]}
    fig = next(r for r in report.rows if r.name == "bn_c").figures
    assert fig.magnification_channel == 3 and fig.magnification_max > 1e3 and fig.var_min == pytest.approx(1e-9)


def test_variance_above_the_float16_maximum_is_flagged():
    report = planted(lambda m: m.bn_f.running_var.__setitem__(5, 1e5))
    assert flagged(report) == {"bn_f": ["fp16_variance"]}


def test_dead_channels_are_counted():
    report = planted(lambda m: m.bn_g.weight.__setitem__(slice(2, 5), 0.0))
    assert next(r for r in report.rows if r.name == "bn_g").figures.dead_channels == 3
    assert flagged(report) == {}  # a count, not a flag


def test_non_finite_statistics_are_flagged():
    report = planted(lambda m: m.bn_e.running_mean.__setitem__(0, float("nan")))
    assert flagged(report) == {"bn_e": ["non_finite"]}


def test_a_fresh_model_has_never_learned_statistics():
    torch.manual_seed(0)
    report = inspect(zoo.REFERENCE_MODELS["resnet_digits"].factory().eval(), example("resnet_digits"))
    assert report.rows and all(r.flags == ["never_learned"] for r in report.rows)
    assert report.summary.risky == len(report.rows)


def test_track_running_stats_false_is_flagged():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, track_running_stats=False), nn.ReLU()).eval()
    (row,) = inspect(model, (torch.randn(2, 3, 4, 4),)).rows
    assert row.flags == ["batch_statistics"] and row.fold is None and "batch statistics" in row.reason
    assert row.figures is None and row.note == "no running statistics"


ONNX_TRAINING_BN = """<ir_version: 8, opset_import: ["" : 17]>
g (float[N,3,4,4] x, float[4,3,1,1] w, float[4] s, float[4] b, float[4] m, float[4] v)
  => (float[N,4,4,4] y, float[4] rm, float[4] rv) {
    z = Conv (x, w)
    y, rm, rv = BatchNormalization <training_mode = 1> (z, s, b, m, v)
}"""
ONNX_EVAL_BN = """<ir_version: 8, opset_import: ["" : 17]>
g (float[N,3,4,4] x, float[4,3,1,1] w, float[4] s, float[4] b, float[4] m, float[4] v) => (float[N,4,4,4] y) {
    z = Conv (x, w)
    y = BatchNormalization (z, s, b, m, v)
}"""


def test_training_mode_bn_in_an_onnx_graph_is_flagged():
    (row,) = inspect(build_onnx(ONNX_TRAINING_BN)).rows
    assert row.flags == ["training_mode"] and row.fold is None and "BN009" in row.reason
    assert row.figures is not None and row.figures.channels == 4  # its initializers are still read


def test_onnx_statistics_come_from_the_initializers():
    model = build_onnx(ONNX_EVAL_BN)
    (row,) = inspect(model).rows
    values = {t.name: onnx.numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer}
    scale = np.abs(values["s"]) / np.sqrt(values["v"] + row.eps)
    assert (row.producer, row.consumers, row.flags) == ("Conv#0", ["(output)"], [])
    assert row.figures.var_max == pytest.approx(values["v"].max())
    assert row.figures.magnification_max == pytest.approx(scale.max())
    assert row.figures.magnification_channel == int(scale.argmax())
    assert row.momentum is None and row.num_batches_tracked is None


# -- drift (--data) ----------------------------------------------------------------------------------------------------
def test_drift_puts_the_shifted_layer_first():
    x = torch.randn(128, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    model = bnfold.recalibrate(zoo.build("resnet_digits"), list(x.split(64))).model  # statistics = the data's
    with torch.no_grad():
        bn = model.stages[1][0].bn2
        bn.running_mean += 5 * bn.running_var.sqrt()
    report = inspect(model, example("resnet_digits"), data=list(x.split(64)))
    assert report.drift[0].name == "stages.1.0.bn2" and report.drift[0].mean_shift == pytest.approx(5, rel=1e-3)
    assert all(d.mean_shift < 1e-3 for d in report.drift[1:])
    assert [d.score for d in report.drift] == sorted((d.score for d in report.drift), reverse=True)
    assert next(r for r in report.rows if r.name == "stages.1.0.bn2").drift == report.drift[0]
    assert report.drift_samples == 128


def test_drift_needs_the_eager_model():
    x = torch.randn(8, 1, 8, 8)
    report = inspect(torch.jit.script(zoo.build("resnet_digits")), (x,), data=[x])
    assert report.drift is None and any("eager model" in n for n in report.notes)


# -- the command line, every format ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def saved(tmp_path_factory, digits_model):
    """The bundled architecture in every format (written once: exporting takes seconds)."""
    tmp_path = tmp_path_factory.mktemp("formats")
    state = digits_model.state_dict()
    x = torch.randn(4, 1, 8, 8)
    paths = {
        "state_dict": tmp_path / "plain.pt",
        "safetensors": tmp_path / "weights.safetensors",
        "torchscript": tmp_path / "scripted.pt",
        "export": tmp_path / "program.pt2",
        "onnx": tmp_path / "model.onnx",
    }
    torch.save(state, paths["state_dict"])
    save_file({k: v.contiguous() for k, v in state.items()}, str(paths["safetensors"]))
    torch.jit.save(torch.jit.script(digits_model), str(paths["torchscript"]))
    torch.export.save(torch.export.export(digits_model, (x,)), str(paths["export"]))
    torch.onnx.export(digits_model, (x,), str(paths["onnx"]), dynamo=False, do_constant_folding=False)
    return paths


@pytest.fixture
def files(saved, in_root):
    return saved


@pytest.mark.parametrize(("kind", "extra"), [
    ("state_dict", ARCH + SHAPE),
    ("safetensors", ARCH + SHAPE),
    ("torchscript", SHAPE),
    ("export", []),  # a .pt2 program carries its input shapes
    ("onnx", []),  # so does an ONNX graph
])
def test_every_format_through_the_command_line(files, tmp_path, kind, extra):
    report_path = tmp_path / "inspect.json"
    result = run(str(files[kind]), "--json", str(report_path), *extra)
    assert result.exit_code == 0, result.output
    assert "9 BatchNorm(s): 9 foldable, 0 left, 0 risky" in result.output
    assert "PASSED" not in result.output and "FAILED" not in result.output  # no verdict
    doc = json.loads(report_path.read_text())
    assert set(doc) == DOC_KEYS and doc["schema_version"] == 1 and doc["command"] == "inspect"
    assert doc["input"]["format"] == kind and set(doc["flags"]) == set(FLAGS)
    assert len(doc["bns"]) == 9 and all(set(row) == ROW_KEYS for row in doc["bns"])
    assert all(row["channels"] and row["magnification_max"] > 0 for row in doc["bns"])
    loaded = load(files[kind], arch="models.zoo:resnet_digits" if "--arch" in extra else None)
    shapes = loaded.input_specs or ([bnfold.InputSpec((4, 1, 8, 8))] if kind != "onnx" else None)
    assert plan_of_rows(doc["bns"]) == plan_of_fuse(bnfold.fuse(loaded.model, shapes))


def test_onnx_training_mode_through_the_command_line(tmp_path):
    path = tmp_path / "training.onnx"
    onnx.save(build_onnx(ONNX_TRAINING_BN), str(path))
    report_path = tmp_path / "inspect.json"
    result = run(str(path), "--json", str(report_path))
    assert result.exit_code == 0, result.output
    assert "training_mode" in result.output and "1 risky" in result.output
    (row,) = json.loads(report_path.read_text())["bns"]
    assert row["flags"] == ["training_mode"] and row["status"] == "left" and row["momentum"] is None


def test_data_through_the_command_line(tmp_path, in_root):
    model = zoo.build("resnet_digits")
    weights = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    data = tmp_path / "calib.npy"
    np.save(data, np.random.default_rng(0).normal(size=(64, 1, 8, 8)).astype(np.float32))
    report_path = tmp_path / "inspect.json"
    result = run(str(weights), *ARCH, *SHAPE, "--data", str(data), "--json", str(report_path))
    assert result.exit_code == 0, result.output
    assert "worst first" in result.output
    drift = json.loads(report_path.read_text())["drift"]
    assert drift["samples"] == 64 and len(drift["layers"]) == 9
    scores = [max(d["mean_shift"], np.log(d["var_ratio"])) for d in drift["layers"]]
    assert scores == sorted(scores, reverse=True)


def test_data_on_an_onnx_graph_is_a_note(files, tmp_path):
    data = tmp_path / "calib.npy"
    np.save(data, np.zeros((4, 1, 8, 8), dtype=np.float32))
    result = run(str(files["onnx"]), "--data", str(data))
    assert result.exit_code == 0, result.output
    assert "needs the eager model" in result.output


# -- the plot ------------------------------------------------------------------------------------------------------
def test_plot_is_a_png(files, tmp_path):
    pytest.importorskip("matplotlib")
    picture = tmp_path / "bn.png"
    result = run(str(files["safetensors"]), *ARCH, *SHAPE, "--plot", str(picture))
    assert result.exit_code == 0, result.output
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and picture.stat().st_size > 10_000


def test_plot_with_drift_is_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    from bnfold.plot import plot_inspect

    x = torch.randn(64, 1, 8, 8)
    report = inspect(zoo.build("resnet_digits"), example("resnet_digits"), data=[x])
    plot_inspect(report, tmp_path / "drift.png")
    assert (tmp_path / "drift.png").read_bytes()[:4] == b"\x89PNG"


def test_plot_without_matplotlib_names_the_extra(files, tmp_path, monkeypatch):
    for module in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, module, None)  # import raises ImportError
    picture = tmp_path / "bn.png"
    result = run(str(files["onnx"]), "--plot", str(picture))
    assert_one_error(result, "matplotlib", 'pip install "bnfold[plot]"')
    assert not picture.exists()


# -- bad input ---------------------------------------------------------------------------------------------------------
def assert_one_error(result, *fragments: str) -> None:
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error: ") and result.output.count("error:") == 1, result.output
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in result.output


def test_missing_file(tmp_path):
    assert_one_error(run(str(tmp_path / "nope.pt")), "nope.pt")


def test_state_dict_without_input_shape(files):
    assert_one_error(run(str(files["state_dict"]), *ARCH), "does not say what input it takes", "--input-shape")


def test_plot_must_be_png(files, tmp_path):
    assert_one_error(run(str(files["onnx"]), "--plot", str(tmp_path / "bn.svg")), "PNG", "bn.png")


def test_json_may_not_overwrite_the_model(files):
    assert_one_error(run(str(files["onnx"]), "--json", str(files["onnx"])), "--json")


def test_plot_may_not_overwrite_the_data(files, tmp_path):
    data = tmp_path / "calib.png"
    data.write_bytes(b"")
    assert_one_error(run(str(files["safetensors"]), *ARCH, *SHAPE, "--data", str(data), "--plot", str(data)),
                     "--plot")


class SpareBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn, self.spare = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))  # self.spare is registered and never called


def test_bn_modules_the_forward_never_calls_are_a_note():
    report = inspect(SpareBN().eval(), (torch.randn(2, 3, 4, 4),))
    assert [r.name for r in report.rows] == ["bn"]
    assert any("not in the plan" in n and "spare" in n for n in report.notes)
