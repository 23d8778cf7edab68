"""Each model kind decides for itself (``bnfold/kinds/``): the inputs it declares, the commands it refuses, how
it is folded and proven; and the commands run as library calls, with the options the CLI builds."""

from __future__ import annotations

import json

import onnx
import pytest
import torch

import bnfold
from bnfold.commands import export_file, fuse_file, inspect_file
from bnfold.errors import InputSpecError, OutputError
from bnfold.kinds import ExportAdapter, ModuleAdapter, OnnxAdapter, ScriptAdapter, adapter_for
from bnfold.load import load
from bnfold.options import Comparing, ExportOptions, FuseOptions, InspectOptions, ModelSource
from models import zoo


@pytest.fixture(scope="module")
def program_file(tmp_path_factory):
    model = zoo.build("resnet_digits").eval()
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    path = tmp_path_factory.mktemp("kinds") / "digits.pt2"
    torch.export.save(torch.export.export(model, (x,)), str(path))
    return path, model, x


def test_adapter_for_picks_each_kind(digits_model, digits_input):
    program = torch.export.export(digits_model.eval(), digits_input)
    assert type(adapter_for(digits_model)) is ModuleAdapter
    assert type(adapter_for(torch.jit.script(digits_model))) is ScriptAdapter
    assert type(adapter_for(program)) is ExportAdapter
    assert type(adapter_for(onnx.ModelProto())) is OnnxAdapter
    with pytest.raises(TypeError, match="not dict"):
        adapter_for({})


def test_fuse_takes_a_program_without_example_inputs(program_file):
    """A ``.pt2`` program declares its inputs: fuse() reads them as plan() and export() do (it refused before)."""
    path, model, x = program_file
    program = load(path).model
    planned = bnfold.plan(program)
    result = bnfold.fuse(program)
    assert result.ok and {f.bn.name for f in result.folded} == {f.bn.name for f in planned.folds}
    assert len(result.folded) == 9 and not result.skipped
    with torch.no_grad():  # against the unfolded eval model, computed here
        torch.testing.assert_close(result.model.module()(x), model(x), atol=1e-5, rtol=1e-4)


def test_an_eager_model_without_inputs_is_refused_with_the_hint(digits_model):
    with pytest.raises(InputSpecError, match="no example inputs were given") as info:
        bnfold.fuse(digits_model)
    assert "--input-shape" in info.value.hint


def test_an_onnx_graph_is_refused_where_it_does_not_apply(digits_model, digits_input, tmp_path):
    path = tmp_path / "m.onnx"
    torch.onnx.export(digits_model.eval(), digits_input, str(path), dynamo=False)
    graph = onnx.load(str(path))
    with pytest.raises(InputSpecError, match="the model is already an ONNX graph") as info:
        bnfold.export(graph, digits_input, tmp_path / "out.onnx")
    assert info.value.hint == "bnfold fuse model.onnx folds it and proves the result in onnxruntime"
    with pytest.raises(InputSpecError, match=f"{path} is already an ONNX graph") as info:
        export_file(ExportOptions(model=ModelSource(path), output=tmp_path / "out.onnx"))
    assert str(path) in info.value.hint


def test_commands_run_without_the_cli(program_file, tmp_path):
    """What `bnfold fuse` and `bnfold inspect` do with files, called with typed options: paths checked first,
    the output written only when parity holds, the JSON report beside it."""
    path, model, x = program_file
    out = tmp_path / "folded.pt2"
    report = tmp_path / "fuse.json"
    run = fuse_file(FuseOptions(model=ModelSource(path), compare=Comparing(seed=1), output=out, json_path=report))
    assert run.result.ok and run.written == str(out) and run.output == {"path": str(out), "format": "export"}
    assert run.input["format"] == "export" and run.input["shapes"] == ["4,1,8,8"]
    assert not report.exists()  # the CLI renders and writes the report; the library returns it
    with torch.no_grad():
        torch.testing.assert_close(torch.export.load(str(out)).module()(x), model(x), atol=1e-5, rtol=1e-4)
    inspected = inspect_file(InspectOptions(model=ModelSource(path)))
    assert len(inspected.result.rows) == 9 and inspected.written is None
    with pytest.raises(OutputError, match="is the input"):
        fuse_file(FuseOptions(model=ModelSource(path), output=path))
    with pytest.raises(InputSpecError, match="--atol"):
        fuse_file(FuseOptions(model=ModelSource(path), compare=Comparing(atol=-1.0)))
    json.dumps(run.result.to_dict(), default=str)  # the result serialises as the CLI's report does
