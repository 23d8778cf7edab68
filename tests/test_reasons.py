"""One place for each pairing decision, and a stable code beside every skip's words.

* the registry (:data:`bnfold.discover.reasons.CODES`) documents every code, and every code the package writes
  is in it;
* the pairing modules import one way (nodes <- rules <- graph), with no import hidden in a function body;
* a BN skipped for a given cause carries the expected code: eager models (torch.fx and observed discovery) and
  ONNX graphs;
* ``bnfold inspect`` counts left BNs by code;
* a BN on a branch of a block that does not merge is "not adjacent" to a conv, and the block's reason (with its
  code) replaces that one, and only that one.
"""

from __future__ import annotations

import ast
import re
import warnings
from collections import OrderedDict
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx import numpy_helper
from torch import nn

import bnfold
from bnfold.discover.graph import Skip
from bnfold.discover.reasons import CODES, Reason
from bnfold.inspect import inspect
from bnfold.onnx.fold import discover_graph
from bnfold.report import inspect_summary_line
from tests.onnx_graphs import build

PACKAGE = Path(bnfold.__file__).parent
X = (2, 4, 6, 6)


# -- the registry ------------------------------------------------------------------------------------------------
def test_every_code_is_documented_and_well_formed():
    assert len(CODES) == len(set(CODES)) and len(set(CODES.values())) == len(CODES)  # no two codes mean one thing
    for code, meaning in CODES.items():
        assert re.fullmatch(r"[a-z]+(-[a-z0-9]+)*", code), code
        assert len(meaning) > 20 and meaning == meaning.strip(), code


def test_every_code_the_package_writes_is_registered():
    """Each ``Reason("...")`` and each code given to ``Skip(...)`` in the source is a registry code."""
    used: set[str] = set()
    for path in PACKAGE.rglob("*.py"):
        for call in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Name)):
                continue
            literal = {"Reason": call.args[:1], "Skip": call.args[2:3]}.get(call.func.id, [])
            literal += [k.value for k in call.keywords if k.arg == "code"] if call.func.id in ("Reason", "Skip") else []
            used |= {a.value for a in literal if isinstance(a, ast.Constant) and isinstance(a.value, str)}
    assert used and used <= set(CODES), used - set(CODES)
    assert {"not-adjacent", "shared-output", "not-constant", "training-mode", "padding"} <= used


def test_a_code_outside_the_registry_is_refused():
    with pytest.raises(AssertionError, match="unregistered"):
        Reason("no-such-code", "words")
    with pytest.raises(AssertionError, match="unregistered"):
        Skip("bn", "words", "no-such-code")


def test_skip_to_dict_has_the_code_beside_the_words():
    why = Reason("padding", "feeds padded conv c")
    assert Skip.because("bn", why).to_dict() == {"bn": "bn", "reason": "feeds padded conv c", "code": "padding"}
    assert Skip("bn", "made elsewhere").code == "unclassified"


def _imports(module: str) -> tuple[set[str], set[str]]:
    """(bnfold modules imported at module level, those imported inside a function body) by ``module``."""
    tree = ast.parse((PACKAGE / "discover" / f"{module}.py").read_text())
    top = {n.module for n in tree.body if isinstance(n, ast.ImportFrom) and n.module}
    nested = {n.module for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
              for n in ast.walk(f) if isinstance(n, ast.ImportFrom) and n.module and n.module.startswith("bnfold")}
    return top, nested


def test_pairing_modules_import_one_way():
    """Types (nodes) <- rules <- orchestration (graph); nothing dodges a circle with an import in a function."""
    allowed = {"reasons": set(), "nodes": {"bnfold.discover.reasons"},
               "rules": {"bnfold.discover.nodes", "bnfold.discover.reasons"},
               "graph": {"bnfold.discover.nodes", "bnfold.discover.reasons", "bnfold.discover.rules"}}
    for module, may in allowed.items():
        top, nested = _imports(module)
        assert {m for m in top if m.startswith("bnfold.discover")} == may, module
        assert not nested, (module, nested)


# -- eager models: the code of each cause --------------------------------------------------------------------------
def conv_bn(cin: int, cout: int, k: int, stride: int = 1, padding: int = 0) -> nn.Sequential:
    return nn.Sequential(OrderedDict(conv=nn.Conv2d(cin, cout, k, stride=stride, padding=padding, bias=False),
                                     bn=nn.BatchNorm2d(cout)))


class Summed(nn.Module):
    """A RepVGG-like block: the sum of its branches (each a module, applied to the input)."""

    def __init__(self, **branches: nn.Module) -> None:
        super().__init__()
        for name, branch in branches.items():
            self.add_module(name, branch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sum(branch(x) for branch in self.children())


class BNAct(nn.BatchNorm2d):
    """A BN with its own activation: not a plain BN."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(super().forward(x))


class StdConv(nn.Conv2d):
    """Weight standardisation: the conv reads a weight computed in forward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = (self.weight - self.weight.mean((1, 2, 3), keepdim=True)) / (self.weight.std((1, 2, 3), keepdim=True) + 1e-5)
        return F.conv2d(x, w, self.bias)


class ReLUBetween(nn.Module):  # conv -> relu -> bn: nothing adjacent
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(torch.relu(self.conv(x)))


class ConvOutputReturned(nn.Module):  # the conv's output is also a model output
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y), y


class BNTwice(nn.Module):  # one BN module runs twice
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.bn = nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.a(x)) + self.bn(self.b(x))


class ConvTwice(nn.Module):  # the producer runs twice (shared weights)
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv(self.conv(x)))


class LinearRank3(nn.Module):  # Linear on (N, C, F), BN over C: not the Linear's features
    def __init__(self) -> None:
        super().__init__()
        self.fc, self.bn = nn.Linear(6, 5), nn.BatchNorm1d(4)

    def forward(self, x):
        return self.bn(self.fc(x.flatten(2)[..., :6]))


class CatAxis2(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.bn = nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(torch.cat([self.a(x), self.b(x)], 2))


class CatReLU(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.bn = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(8)

    def forward(self, x):
        return self.bn(torch.cat([self.a(x), torch.relu(x)], 1))


class AddBroadcast(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.bn = nn.Conv2d(4, 4, 1), nn.Conv2d(4, 1, 3, padding=1), nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.a(x) + self.b(x.flip(-1)))


def _stats(model: nn.Module) -> nn.Module:
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_var is not None:
                m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
    return model.eval()


#: name: (model, input shape, {BN: expected code}, the discovery methods to check)
EAGER = {
    "not_adjacent": (ReLUBetween, X, {"bn": "not-adjacent"}, ("fx", "observed")),
    "shared_output": (ConvOutputReturned, X, {"bn": "shared-output"}, ("fx", "observed")),
    "bn_reused": (BNTwice, X, {"bn": "bn-reused"}, ("fx", "observed")),
    "layer_reused": (ConvTwice, X, {"bn": "layer-reused"}, ("fx", "observed")),
    "batch_statistics": (lambda: nn.Sequential(OrderedDict(conv=nn.Conv2d(4, 4, 1),
                                                           bn=nn.BatchNorm2d(4, track_running_stats=False))),
                         X, {"bn": "batch-statistics"}, ("fx", "observed")),
    "padding": (lambda: nn.Sequential(OrderedDict(bn=nn.BatchNorm2d(4), conv=nn.Conv2d(4, 4, 3, padding=1))),
                X, {"bn": "padding"}, ("fx", "observed")),
    "activation": (lambda: nn.Sequential(OrderedDict(bn=BNAct(4), conv=nn.Conv2d(4, 4, 1))), X,
                   {"bn": "activation"}, ("fx", "observed")),
    "linear_rank": (LinearRank3, X, {"bn": "linear-rank"}, ("fx", "observed")),
    "not_constant": (lambda: nn.Sequential(OrderedDict(conv=StdConv(4, 4, 3, padding=1, bias=False),
                                                       bn=nn.BatchNorm2d(4))), X, {"bn": "not-constant"},
                     ("fx", "observed")),
    "concat_axis": (CatAxis2, X, {"bn": "concat-axis"}, ("fx",)),
    "not_a_layer": (CatReLU, X, {"bn": "not-a-layer"}, ("fx",)),
    "broadcast": (AddBroadcast, X, {"bn": "broadcast"}, ("fx",)),
    # the 1x1 conv has stride 2: the block cannot merge; its conv+BN branches fold into their convs
    "unmergeable_branch": (lambda: Summed(d=conv_bn(4, 4, 3, 1, 1), o=conv_bn(4, 4, 1, 2, 3), i=nn.BatchNorm2d(4)),
                           X, {"i": "unmergeable-branch"}, ("fx",)),
}


def _fuse(model: nn.Module, shape: tuple[int, ...], **kwargs) -> bnfold.FuseResult:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return bnfold.fuse(model, (torch.randn(shape, generator=torch.Generator().manual_seed(1)),), **kwargs)


@pytest.mark.parametrize(("name", "method"), [(n, m) for n, case in EAGER.items() for m in case[3]])
def test_eager_skip_carries_the_code_of_its_cause(name, method):
    make, shape, expected, _ = EAGER[name]
    result = _fuse(_stats(make()), shape, method=method)
    assert result.ok, result.to_dict()
    codes = {s.bn: s.code for s in result.skipped}
    for bn, code in expected.items():
        assert codes.get(bn) == code, (bn, result.skipped)


# -- ONNX graphs -------------------------------------------------------------------------------------------------
HEADER = '<ir_version: 8, opset_import: ["" : 17]>\n'
CONV_BN = """g (float[N,3,4,4] x, float[4,3,1,1] w, float[4] s, float[4] b, float[4] m, float[4] v)
              => (float[N,4,4,4] y) {
    z = Conv (x, w)
    y = BatchNormalization (z, s, b, m, v)
}"""
#: name: (graph, build() keyword arguments, expected code of BatchNormalization#1, or of the only skip)
ONNX = {
    "not_adjacent": ("""g (float[N,3,4,4] x, float[4,3,1,1] w, float[4] s, float[4] b, float[4] m, float[4] v)
                         => (float[N,4,4,4] y) {
        z = Conv (x, w)
        r = Relu (z)
        y = BatchNormalization (r, s, b, m, v)
    }""", {}, "not-adjacent"),
    "shared_output": ("""g (float[N,3,4,4] x, float[4,3,1,1] w, float[4] s, float[4] b, float[4] m, float[4] v)
                         => (float[N,4,4,4] y, float[N,4,4,4] z) {
        z = Conv (x, w)
        y = BatchNormalization (z, s, b, m, v)
    }""", {}, "shared-output"),
    "weight_graph_input": (CONV_BN, {"constants": ("s", "b", "m", "v")}, "not-constant"),
    "scale_listed_as_input": (CONV_BN, {"listed": ("s",)}, "not-constant"),
    "training_mode": ("""g (float[N,3,4,4] x, float[4,3,1,1] w, float[4] s, float[4] b, float[4] m, float[4] v)
                         => (float[N,4,4,4] y, float[4] rm, float[4] rv) {
        z = Conv (x, w)
        y, rm, rv = BatchNormalization <training_mode = 1> (z, s, b, m, v)
    }""", {}, "training-mode"),
    "padding": ("""g (float[N,4,8,8] x, float[4] s, float[4] b, float[4] m, float[4] v, float[3,4,3,3] w)
                   => (float[N,3,8,8] y) {
        z = BatchNormalization (x, s, b, m, v)
        y = Conv <pads = [1,1,1,1]> (z, w)
    }""", {}, "padding"),
    "weight_shape": ("""g (float[2,N,6] x, float[2,6,5] w, float[2] s, float[2] b, float[2] m, float[2] v)
                        => (float[2,N,5] y) {
        z = MatMul (x, w)
        y = BatchNormalization (z, s, b, m, v)
    }""", {}, "weight-shape"),
    "constant_first_operand": ("""g (float[N,6] x, float[5,N] w, float[5] s, float[5] b, float[5] m, float[5] v)
                                  => (float[5,6] y) {
        z = MatMul (w, x)
        y = BatchNormalization (z, s, b, m, v)
    }""", {"constants": ("w", "s", "b", "m", "v")}, "not-a-layer"),
    "transposed_input": ("""g (float[6,4] x, float[4] s, float[4] b, float[4] m, float[4] v, float[5,6] w)
                            => (float[4,5] y) {
        z = BatchNormalization (x, s, b, m, v)
        y = Gemm <transA = 1, transB = 1> (z, w)
    }""", {}, "transposed-input"),
    "subgraph": ("""g (bool c, float[N,4] x, float[4] s, float[4] b, float[4] m, float[4] v) => (float[N,4] y) {
        y = If (c) <then_branch = t () => (float[N,4] yt) { yt = BatchNormalization (x, s, b, m, v) },
                    else_branch = e () => (float[N,4] ye) { ye = Identity (x) }>
    }""", {"constants": ("s", "b", "m", "v")}, "subgraph"),
}


def _only_code(model: onnx.ModelProto) -> str:
    (skip,) = discover_graph(model).skips
    return skip.code


@pytest.mark.parametrize("name", list(ONNX))
def test_onnx_skip_carries_the_code_of_its_cause(name):
    text, kwargs, code = ONNX[name]
    assert _only_code(build(HEADER + text, **kwargs)) == code


def test_onnx_integer_parameter_is_not_float():
    model = build(HEADER + CONV_BN)
    (mean,) = [t for t in model.graph.initializer if t.name == "m"]
    mean.CopyFrom(numpy_helper.from_array(np.zeros(4, dtype=np.int64), "m"))
    assert _only_code(model) == "not-float"


def test_onnx_spatial_0():
    model = build('<ir_version: 4, opset_import: ["" : 7]>\n'
                  + CONV_BN.replace("BatchNormalization (", "BatchNormalization <spatial = 0> ("))
    assert _only_code(model) == "spatial"


def test_the_same_cause_has_the_same_code_in_eager_and_onnx():
    """Conv -> ReLU -> BN, as a module and as ONNX: one code, not two words."""
    eager = _fuse(_stats(ReLUBetween()), X).skipped
    graph = discover_graph(build(HEADER + ONNX["not_adjacent"][0])).skips
    assert [s.code for s in eager] == [s.code for s in graph] == ["not-adjacent"]


# -- inspect -----------------------------------------------------------------------------------------------------
class TwoLeft(nn.Module):
    """bn1 folds; bn2 follows a ReLU (not adjacent); bn3 feeds a padded conv."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.bn1, self.bn2 = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4), nn.BatchNorm2d(4)
        self.bn3, self.c2 = nn.BatchNorm2d(4), nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        return self.c2(self.bn3(self.bn2(torch.relu(self.bn1(self.c1(x))))))


def test_inspect_counts_left_bns_by_code():
    x = (torch.randn(X, generator=torch.Generator().manual_seed(1)),)
    report = inspect(_stats(TwoLeft()), x)
    rows = {r.name: r for r in report.rows}
    assert rows["bn1"].fold is not None and rows["bn1"].code is None
    assert (rows["bn2"].code, rows["bn3"].code) == ("not-adjacent", "padding")
    assert rows["bn2"].reason.startswith("not next to a conv/linear")  # the words are unchanged
    doc = report.to_dict()
    assert doc["summary"]["left"] == {"not-adjacent": 1, "padding": 1}
    assert set(doc["summary"]["left"]) <= set(CODES)
    assert inspect_summary_line(report.summary) == "3 BatchNorm(s): 1 foldable, 2 left (1 not-adjacent; 1 padding), 0 risky"


def test_inspect_of_an_onnx_graph_counts_by_code():
    report = inspect(build(HEADER + ONNX["training_mode"][0]))
    assert report.to_dict()["summary"]["left"] == {"training-mode": 1}


# -- the branch that replaced 'not next to' skips ------------------------------------------------------------------
def _skips(result: bnfold.FuseResult) -> dict[str, Skip]:
    return {s.bn: s for s in result.skipped}


def test_an_unmergeable_block_explains_its_identity_bn():
    """The identity BN alone is not next to a conv; the block's reason replaces that one (words and code)."""
    result = _fuse(_stats(Summed(d=conv_bn(4, 4, 3, 1, 1), o=conv_bn(4, 4, 1, 2, 3), i=nn.BatchNorm2d(4))), X)
    skip = _skips(result)["i"]
    assert skip.code == "unmergeable-branch"
    assert skip.reason.startswith("on a branch of") and "cannot merge into one conv" in skip.reason
    assert "stride" in skip.reason
    assert {f.bn.name for f in result.folded} == {"d.bn", "o.bn"}


def test_keep_structure_explains_the_bns_a_merge_would_remove():
    """keep_structure: no merge; the identity BN says why (structure-kept), the conv+BN branches fold as usual."""
    result = _fuse(_stats(Summed(d=conv_bn(4, 4, 3, 1, 1), o=conv_bn(4, 4, 1), i=nn.BatchNorm2d(4))), X,
                   keep_structure=True)
    skip = _skips(result)["i"]
    assert skip.code == "structure-kept" and "--keep-structure" in skip.reason
    assert {f.bn.name for f in result.folded} == {"d.bn", "o.bn"}
    merged = _fuse(_stats(Summed(d=conv_bn(4, 4, 3, 1, 1), o=conv_bn(4, 4, 1), i=nn.BatchNorm2d(4))), X)
    assert {f.position for f in merged.folded} == {"merge"} and not merged.skipped


class BranchOutputUsed(nn.Module):
    """A block whose dense conv output is also returned: it cannot merge. The dense BN's own reason (its conv's
    output feeds the model output too) is not 'not adjacent', so it is kept; the identity BN gets the block's."""

    def __init__(self) -> None:
        super().__init__()
        self.d, self.o, self.i = conv_bn(4, 4, 3, padding=1), conv_bn(4, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x):
        a = self.d.conv(x)
        return self.d.bn(a) + self.o(x) + self.i(x), a


def test_only_not_adjacent_skips_are_replaced_by_the_blocks_reason():
    skips = _skips(_fuse(_stats(BranchOutputUsed()), X))
    assert skips["d.bn"].code == "shared-output" and "also feeds" in skips["d.bn"].reason
    assert skips["i"].code == "unmergeable-branch" and "cannot merge" in skips["i"].reason
