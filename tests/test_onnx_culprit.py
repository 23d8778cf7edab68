"""BN010 names the culprit: the first ONNX node and torch module where the graph and the eval model disagree.

Graphs are exported by bnfold from one small topology (below), then damaged in one place: one BN's running
mean, or one Conv's weight, in one channel. The diagnosis must name that node and the module it stands for,
with a figure pointing at the damaged channel, and must name nothing in a clean export. The same holds for
graphs whose node names and metadata carry no module scopes (stripped, or a foreign converter's): their
tensors are matched to the module outputs by value.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn

import bnfold
from bnfold.errors import InputSpecError
from bnfold.findings import Finding
from bnfold.onnx import culprit
from bnfold.onnx.culprit import Divergence, find_divergence
from bnfold.onnx.export import export_onnx
from tests.conftest import sha256

SEED = 0
EXPORT_BATCH = 4


class ConvBnNet(nn.Module):
    """Conv-BN-ReLU-Conv-BN, then a BN neither exporter can fold."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.relu = nn.ReLU()
        self.conv2, self.bn2 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.drop = nn.Dropout(0.5)
        self.bn3 = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))  # conv-BN: both exporters fold bn1 into one Conv node
        x = self.bn2(self.conv2(x))  # the same; TorchScript names the node /conv2/Conv, dynamo files it under bn2
        x += 1  # in place: the tensor bn2 returned is changed before the next module takes it...
        x = self.drop(x)  # ...so this Dropout (no node in eval) must not be compared as if fused with bn2
        x = self.relu(x)  # the same ReLU again: TorchScript names it /relu_1/Relu, dynamo gives both one scope
        return self.bn3(x)  # after a ReLU: not foldable, a BatchNormalization node of its own


class Rescale(nn.Module):
    """Divides by the input's largest magnitude, read as a Python number: the tracer records the number of
    the export batch as a constant, so any other input diverges here."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x / float(x.abs().max())


class RescaledNet(ConvBnNet):
    """ConvBnNet with a traced Python number, in a module of its own or in the model's own forward."""

    def __init__(self, in_module: bool) -> None:
        super().__init__()
        self.in_module = in_module
        self.rescale = Rescale()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x))))))
        x = self.rescale(x) if self.in_module else x / float(x.abs().max())
        return self.bn3(x)


class StubbornBn(nn.Module):
    """``train()`` overridden to keep the BN in training mode: its "eval" output uses batch statistics."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn, self.head = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Conv2d(4, 2, 1)

    def train(self, mode: bool = True) -> StubbornBn:
        super().train(mode)
        self.bn.train(True)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.bn(self.conv(x)))


def prepared(model: nn.Module) -> nn.Module:
    """Seeded weights, and BN statistics far from the defaults (so no two BN tensors are equal and shared by
    the exporter), in eval mode."""
    generator = torch.Generator().manual_seed(SEED)

    def uniform(tensor: torch.Tensor, low: float, high: float) -> None:
        tensor.copy_(torch.rand(tensor.shape, generator=generator) * (high - low) + low)

    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Conv2d):
                uniform(module.weight, -0.3, 0.3)
                uniform(module.bias, -0.1, 0.1)
            elif isinstance(module, nn.BatchNorm2d):
                uniform(module.running_mean, -1, 1)
                uniform(module.running_var, 0.5, 2)
                uniform(module.weight, 0.5, 1.5)
                uniform(module.bias, -0.5, 0.5)
    return model.eval()


def draw(batch: int = EXPORT_BATCH) -> tuple[torch.Tensor, ...]:
    return (torch.randn(batch, 3, 8, 8, generator=torch.Generator().manual_seed(SEED)),)


def export(model: nn.Module, path: Path, exporter: str, inputs: tuple[torch.Tensor, ...] | None = None) -> Path:
    inputs = inputs or draw()
    with torch.no_grad():
        export_onnx(model, inputs, model(*inputs), path, exporter)
    return path


def damage(path: Path, out: Path, op_type: str, which: int, input_index: int, **save: object) -> str:
    """Add 1 to channel 0 of input ``input_index`` (an initializer) of the ``which``-th ``op_type`` node;
    write the graph to ``out``. Returns the node's name."""
    model = onnx.load(str(path))
    node = [n for n in model.graph.node if n.op_type == op_type][which]
    name = node.input[input_index]
    readers = [n for n in model.graph.node if name in n.input]
    assert len(readers) == 1, f"{name} is shared by {len(readers)} nodes"  # damage exactly one node
    init = next(i for i in model.graph.initializer if i.name == name)
    values = numpy_helper.to_array(init).copy()
    values[0] += 1.0
    init.CopyFrom(numpy_helper.from_array(values, name))
    onnx.save(model, str(out), **save)
    return node.name


@pytest.fixture(scope="module")
def net() -> nn.Module:
    return prepared(ConvBnNet())


@pytest.fixture(scope="module")
def torchscript_graph(net, tmp_path_factory) -> Path:
    return export(net, tmp_path_factory.mktemp("ts") / "model.onnx", "torchscript")


# -- the damaged node is named -------------------------------------------------------------------------------
# (op type, which node of that type, damaged input, node name, module, fused modules) for the TorchScript export
DAMAGES = [
    ("BatchNormalization", 0, 3, "/bn3/BatchNormalization", "bn3", ()),  # running mean
    ("Conv", 1, 1, "/conv2/Conv", "bn2", ("conv2",)),  # weight of the Conv that bn2 was folded into
    ("Conv", 0, 1, "/conv1/Conv", "bn1", ("conv1",)),
]


@pytest.mark.parametrize(("op_type", "which", "input_index", "node", "module", "fused"), DAMAGES,
                         ids=["bn-mean", "conv2-weight", "conv1-weight"])
def test_names_the_damaged_node_and_its_module(net, torchscript_graph, tmp_path, op_type, which, input_index,
                                               node, module, fused):
    damaged = tmp_path / "damaged.onnx"
    assert damage(torchscript_graph, damaged, op_type, which, input_index) == node
    found = find_divergence(damaged, net, draw())
    assert isinstance(found, Divergence)
    assert (found.onnx_node, found.op_type, found.module, found.fused) == (node, op_type, module, fused)
    assert not found.diff.passed and found.diff.max_abs > 0.1
    assert found.diff.worst_index[1] == 0  # the damaged channel
    head = f"first divergence at ONNX node {node} (module {module}"
    assert found.message().startswith(head) and "max abs" in found.message()


def test_clean_export_names_nothing(net, torchscript_graph):
    assert find_divergence(torchscript_graph, net, draw()) is None
    assert find_divergence(torchscript_graph, net, draw(batch=1)) is None  # the dynamic batch axis


def test_file_is_not_modified_and_external_data_is_read(net, torchscript_graph, tmp_path):
    folder = tmp_path / "external"
    folder.mkdir()
    damaged = folder / "model.onnx"
    node = damage(torchscript_graph, damaged, "BatchNormalization", 0, 3, save_as_external_data=True,
                  all_tensors_to_one_file=True, location="weights.bin", size_threshold=0)
    before = {p.name: sha256(p) for p in folder.iterdir()}
    found = find_divergence(damaged, net, draw())
    assert found is not None and (found.onnx_node, found.module) == (node, "bn3")
    assert {p.name: sha256(p) for p in folder.iterdir()} == before


def test_a_difference_within_tolerance_is_no_divergence(net, torchscript_graph, tmp_path):
    damaged = tmp_path / "damaged.onnx"
    damage(torchscript_graph, damaged, "BatchNormalization", 0, 3)
    assert find_divergence(damaged, net, draw(), atol=100.0) is None
    with pytest.raises(InputSpecError, match="rtol must be a finite number"):
        find_divergence(damaged, net, draw(), rtol=-1.0)


def test_a_graph_without_scopes_is_matched_by_value(net, torchscript_graph, tmp_path):
    """A graph whose names map to no module (renamed, or not exported from this model): not a guess by shape
    order, but the module outputs matched to its tensors by value (more below, "graphs without scopes")."""
    damaged = tmp_path / "damaged.onnx"
    damage(torchscript_graph, damaged, "BatchNormalization", 0, 3)
    model = onnx.load(str(damaged))
    for index, node in enumerate(model.graph.node):
        node.name = f"n{index}"
    onnx.save(model, str(damaged))
    found = find_divergence(damaged, net, draw())
    assert found is not None and found.by_value
    assert (found.onnx_node, found.op_type, found.module, found.fused) == ("n6", "BatchNormalization", "bn3", ())


# -- real divergences ----------------------------------------------------------------------------------------
def other_input() -> tuple[torch.Tensor, ...]:
    """Not the export input: twice it, so that the largest activation differs from the one traced."""
    return tuple(2 * t for t in draw())


def test_traced_python_number_in_a_module(tmp_path):
    """The constant traced from the export input's maximum is wrong for any other input."""
    model = prepared(RescaledNet(in_module=True))
    graph = export(model, tmp_path / "model.onnx", "torchscript")
    assert find_divergence(graph, model, draw()) is None  # the export input itself agrees
    found = find_divergence(graph, model, other_input())
    assert found is not None
    assert (found.onnx_node, found.module, found.fused, found.before) == ("/rescale/Div", "rescale", (), None)


def test_traced_python_number_in_the_models_own_forward(tmp_path):
    """The op is in no submodule: bn3 fails because its input already differs, and the culprit is the op
    before it, in the model's own forward."""
    model = prepared(RescaledNet(in_module=False))
    graph = export(model, tmp_path / "model.onnx", "torchscript")
    found = find_divergence(graph, model, other_input())
    assert found is not None
    assert (found.onnx_node, found.op_type, found.module, found.before) == ("/Div", "Div", "", "bn3")
    assert found.message().startswith("first divergence at ONNX node /Div (the model's own forward, before "
                                      "module bn3, whose input already differs)")


def test_bn_kept_in_training_by_train_override_agrees_in_torchscript(tmp_path):
    """The TorchScript exporter keeps that BN in training mode (training_mode=1: BN009's finding), so
    onnxruntime normalises with batch statistics too and nothing diverges. The dynamo exporter folds it
    with its running statistics instead: see test_dynamo_exporter."""
    model = prepared(StubbornBn())
    assert model.bn.training
    graph = export(model, tmp_path / "model.onnx", "torchscript")
    bn = next(n for n in onnx.load(str(graph)).graph.node if n.op_type == "BatchNormalization")
    assert onnx.helper.get_node_attr_value(bn, "training_mode") == 1
    assert find_divergence(graph, model, draw()) is None


def test_dynamo_exporter(net, tmp_path):
    """One export (the dynamo exporter takes seconds): clean, then each damage; then a BN the model keeps in
    training, which this exporter folds with its running statistics (a real divergence)."""
    graph = export(net, tmp_path / "model.onnx", "dynamo")
    assert find_divergence(graph, net, draw()) is None
    for op_type, which, input_index, module, fused in (("BatchNormalization", 0, 3, "bn3", ()),
                                                       ("Conv", 1, 1, "bn2", ("conv2",))):
        damaged = tmp_path / f"{op_type}.onnx"
        node = damage(graph, damaged, op_type, which, input_index)
        found = find_divergence(damaged, net, draw())
        assert found is not None
        assert (found.onnx_node, found.op_type, found.module, found.fused) == (node, op_type, module, fused)
        assert found.diff.worst_index[1] == 0
    stubborn = prepared(StubbornBn())
    graph = export(stubborn, tmp_path / "stubborn.onnx", "dynamo")
    found = find_divergence(graph, stubborn, draw())
    assert found is not None and (found.op_type, found.module, found.fused) == ("Conv", "bn", ("conv",))
    assert found.diff.max_rel > 0.1 and np.isfinite(found.diff.max_abs)


# -- graphs without scopes: tampered or foreign files, through bnfold.verify ---------------------------------
def strip(path: Path, out: Path) -> Path:
    """A "foreign" copy of the graph at ``path``: no node names, no metadata, intermediate tensors renamed
    ``t0``, ``t1``, ... (graph inputs, outputs and initializers keep their names); written to ``out``."""
    model = onnx.load(str(path))
    kept = {v.name for v in (*model.graph.input, *model.graph.output, *model.graph.initializer)}
    renamed: dict[str, str] = {}
    for node in model.graph.node:
        node.name = ""
        del node.metadata_props[:]
        for slot, name in enumerate(node.input):
            node.input[slot] = renamed.get(name, name)
        for slot, name in enumerate(node.output):
            if name not in kept:
                node.output[slot] = renamed.setdefault(name, f"t{len(renamed)}")
    del model.graph.value_info[:]
    del model.metadata_props[:]
    onnx.save(model, str(out))
    return out


def position(path: Path, op_type: str, which: int) -> int:
    """The index of the ``which``-th ``op_type`` node in the graph at ``path``: its label once unnamed."""
    return [i for i, n in enumerate(onnx.load(str(path)).graph.node) if n.op_type == op_type][which]


def culprit_of(report) -> Finding:
    """The BN010 finding that names the culprit; fails when the report has none."""
    return next(f for f in report.findings if f.code == "BN010" and f.message.startswith("first divergence"))


def inputs_of(path: Path, index: int) -> tuple[str, ...]:
    return tuple(onnx.load(str(path)).graph.node[index].input)


@pytest.mark.parametrize("input_index", [3, 4], ids=["running-mean", "running-var"])
def test_verify_names_tampered_bn_statistics(net, torchscript_graph, tmp_path, input_index):
    """The file's BN statistics edited after export, node names intact: the scopes name node and module."""
    damaged = tmp_path / "damaged.onnx"
    damage(torchscript_graph, damaged, "BatchNormalization", 0, input_index)
    finding = culprit_of(bnfold.verify(net, example_inputs=draw(), onnx=damaged, checks=("onnx",)))
    assert finding.module == "bn3"
    assert finding.message.startswith("first divergence at ONNX node /bn3/BatchNormalization (module bn3): max abs")


@pytest.mark.parametrize("input_index", [3, 4], ids=["running-mean", "running-var"])
def test_verify_names_tampered_bn_statistics_without_names(net, torchscript_graph, tmp_path, input_index):
    """The same file stripped of names and metadata: the BatchNormalization node is found by value, with its
    inputs, and the module whose output it should have produced."""
    damaged = damage_and_strip(torchscript_graph, tmp_path, "BatchNormalization", 0, input_index)
    index = position(damaged, "BatchNormalization", 0)
    inputs = inputs_of(damaged, index)
    assert inputs[0].startswith("t") and inputs[3:] == ("bn3.running_mean", "bn3.running_var")
    finding = culprit_of(bnfold.verify(net, example_inputs=draw(), onnx=damaged, checks=("onnx",)))
    assert finding.module == "bn3"
    assert finding.message.startswith(f"first divergence at ONNX node BatchNormalization#{index} (module bn3, "
                                      f"matched by value; inputs {', '.join(inputs)}): max abs")
    found = find_divergence(damaged, net, draw())
    assert found is not None and found.by_value and found.inputs == inputs
    assert (found.op_type, found.module, found.fused, found.span) == ("BatchNormalization", "bn3", (), ())
    assert found.diff.worst_index[1] == 0  # the damaged channel


def damage_and_strip(graph: Path, folder: Path, op_type: str, which: int, input_index: int) -> Path:
    damage(graph, folder / "damaged.onnx", op_type, which, input_index)
    return strip(folder / "damaged.onnx", folder / "foreign.onnx")


# (which Conv, damaged input, module, fused module): each BN folded into its Conv by the exporter
CONV_DAMAGES = [(0, 1, "bn1", "conv1"), (1, 1, "bn2", "conv2"), (1, 2, "bn2", "conv2")]


@pytest.mark.parametrize(("which", "input_index", "module", "fused"), CONV_DAMAGES,
                         ids=["conv1-weight", "conv2-weight", "conv2-bias"])
def test_verify_names_tampered_conv_without_names(net, torchscript_graph, tmp_path, which, input_index, module,
                                                  fused):
    """A folded Conv's weight or bias edited, names stripped: that Conv, as the BN folded into it."""
    damaged = damage_and_strip(torchscript_graph, tmp_path, "Conv", which, input_index)
    index = position(damaged, "Conv", which)
    finding = culprit_of(bnfold.verify(net, example_inputs=draw(), onnx=damaged, checks=("onnx",)))
    assert finding.module == module
    assert finding.message.startswith(f"first divergence at ONNX node Conv#{index} (module {module}, fused with "
                                      f"{fused}, matched by value; inputs {', '.join(inputs_of(damaged, index))})")
    found = find_divergence(damaged, net, draw())
    assert found is not None and (found.op_type, found.fused) == ("Conv", (fused,))
    assert found.diff.worst_index[1] == 0


def test_verify_untampered_graph_without_names_has_no_bn010(net, torchscript_graph, tmp_path):
    """Stripped but not tampered: the graph computes what the model does, so nothing fires and nothing is
    named (the value search runs only when an output fails)."""
    foreign = strip(torchscript_graph, tmp_path / "foreign.onnx")
    report = bnfold.verify(net, example_inputs=draw(), onnx=foreign, checks=("onnx",))
    assert "BN010" not in {f.code for f in report.findings}
    assert find_divergence(foreign, net, draw()) is None


def test_model_op_without_names_is_named_before_the_module_it_feeds(tmp_path):
    """The traced Python number in the model's own forward, names stripped: bn3's input matches no tensor, so
    the culprit is the op before it, the Div, in no module."""
    model = prepared(RescaledNet(in_module=False))
    foreign = strip(export(model, tmp_path / "model.onnx", "torchscript"), tmp_path / "foreign.onnx")
    found = find_divergence(foreign, model, other_input())
    index = position(foreign, "Div", 0)
    assert found is not None and found.by_value
    assert (found.onnx_node, found.module, found.before) == (f"Div#{index}", "", "bn3")
    assert found.message().startswith(f"first divergence at ONNX node Div#{index} (the model's own forward, "
                                      "before module bn3, whose input already differs, matched by value")


def test_value_matching_compares_few_tensors_in_full(net, torchscript_graph, tmp_path, monkeypatch):
    """Every node of this graph outputs one shape, the shape of every module call: the mean/magnitude window
    keeps the full comparisons to about one per torch tensor, not every call against every tensor."""
    damaged = damage_and_strip(torchscript_graph, tmp_path, "BatchNormalization", 0, 3)
    calls, _ = culprit._record_calls(net, draw())
    computed = [n for n in onnx.load(str(damaged)).graph.node if n.op_type != "Constant"]
    naive = 2 * (len(calls) - 1) * len(computed)  # each module's input and output against every tensor
    counted = []
    real = culprit.compare_output
    monkeypatch.setattr(culprit, "compare_output", lambda *a, **k: counted.append(a[0]) or real(*a, **k))
    assert find_divergence(damaged, net, draw()).module == "bn3"
    assert len(counted) <= 2 * len(calls) < naive / 3


def test_value_matching_window_drops_no_match(net, torchscript_graph, tmp_path):
    """The window is a necessary condition: it finds exactly the tensors a full comparison with each one
    passes, at the default tolerances and at loose ones."""
    foreign = strip(torchscript_graph, tmp_path / "foreign.onnx")
    model = onnx.load(str(foreign))
    graph = culprit.GraphIndex.of(model.graph)
    arrays = culprit._run_all(model, draw(), graph, tmp_path)
    tensors = culprit._Tensors.of(graph, arrays)
    calls, _ = culprit._record_calls(net, draw())
    matched = 0
    for atol, rtol in ((None, None), (0.05, 0.05)):
        for call in calls:
            everyone = [name for name in tensors.order if arrays[name].shape == tuple(call.output.shape)
                        and culprit.compare_output(name, call.output, arrays[name], atol, rtol).passed]
            assert tensors.matching(call.output, atol, rtol) == everyone, call.name
            matched += bool(everyone)
    assert matched >= len(calls)  # not vacuous: most calls match a tensor (not the convs whose BN was folded)


def test_dynamo_export_without_names(net, tmp_path):
    """One dynamo export (seconds): its BN statistics, then a folded Conv's weight, edited and stripped."""
    graph = export(net, tmp_path / "model.onnx", "dynamo")
    for op_type, which, input_index, module, fused in (("BatchNormalization", 0, 3, "bn3", ()),
                                                       ("Conv", 1, 1, "bn2", ("conv2",))):
        folder = tmp_path / op_type
        folder.mkdir()
        damaged = damage_and_strip(graph, folder, op_type, which, input_index)
        index = position(damaged, op_type, which)
        finding = culprit_of(bnfold.verify(net, example_inputs=draw(), onnx=damaged, checks=("onnx",)))
        assert finding.module == module
        assert finding.message.startswith(f"first divergence at ONNX node {op_type}#{index} (module {module}")
        found = find_divergence(damaged, net, draw())
        assert found is not None and found.by_value and found.inputs == inputs_of(damaged, index)
        assert (found.op_type, found.fused) == (op_type, fused)
