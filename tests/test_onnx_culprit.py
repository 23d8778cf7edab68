"""BN010 names the culprit: the first ONNX node and torch module where the graph and the eval model disagree.

Graphs are exported by bnfold from one small topology (below), then damaged in one place: one BN's running
mean, or one Conv's weight, in one channel. The diagnosis must name that node and the module it stands for,
with a figure pointing at the damaged channel, and must name nothing in a clean export.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn

from bnfold.errors import InputSpecError
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


def test_a_graph_without_scopes_names_nothing(net, torchscript_graph, tmp_path):
    """A graph whose names map to no module (not exported from this model, or renamed): no guess by shape."""
    damaged = tmp_path / "damaged.onnx"
    damage(torchscript_graph, damaged, "BatchNormalization", 0, 3)
    model = onnx.load(str(damaged))
    for index, node in enumerate(model.graph.node):
        node.name = f"n{index}"
    onnx.save(model, str(damaged))
    assert find_divergence(damaged, net, draw()) is None


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
