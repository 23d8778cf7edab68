"""Name the culprit of a BN010: the first ONNX node, and the torch module, where the graph stops computing
what the eval model does.

Why: "output_0 differs by 0.4" says that the export is wrong, not where. Comparing every intermediate tensor
finds the first place the two disagree, which is almost always the cause (a stale BN, a traced Python
number, a mode baked into the graph, a corrupted weight).

How:

1. The eval model runs once (no grad, seeded like every reference run) with hooks on every module; each call
   records its first input tensor and its output's first tensor, in completion order.
2. onnxruntime runs the graph once, in this process, with every node output made a graph output and its
   graph optimisations off (``ORT_DISABLE_ALL``: a fused node would hide the tensors inside it). The file is
   never modified: the graph is edited in memory, and external data is read from the model's folder.
3. Each ONNX node is mapped to the module call whose scope it carries (per exporter, below); a call owns the
   nodes of its own scope and of every call inside it. A call is compared with the *last* of its nodes whose
   output has the call's output shape, preferring a node whose output leaves the call (is read by a node
   outside it, or is a graph output).
4. Calls are compared in completion order with :func:`bnfold.compare.compare_output`, so a module comes after
   every module inside it: the first call that fails is the innermost that diverges (its parents fail because
   it does). Its input is checked too: when the tensor entering its nodes already differs, the divergence
   happened before it, in an enclosing module's own ops (``x / float(x.max())`` between two submodules) or in
   a module that maps to no node. The culprit is then the first of the ops between the tensors that last
   agreed and that input (``span``: torch has no value for them, so which of them is wrong is not known).

Mapping, per exporter (what torch 2.13 writes):

* TorchScript exporter (``dynamo=False``): the node name is the scope path, one component per enclosing
  module call, then the op: ``/layer1/layer1.0/conv1/Conv``. A component is the module's name from its last
  non-numeric atom (``layer1.0.conv1`` -> ``conv1``; ``layer1.0`` stays ``layer1.0``); the model's own ops
  have none (``/Mul``). A module called again gets ``_1``, ``_2`` on its last component
  (``/layer1/layer1.0/relu_1/Relu``), so the calls are told apart by that count.
* torch.export-based exporter (``dynamo=True``): names say nothing (``node_Conv_31``); the
  ``pkg.torch.onnx.name_scopes`` metadata lists the full names of the enclosing calls, the FX node last:
  ``['', 'layer1', 'layer1.0', 'layer1.0.bn1', '_native_batch_norm_legit_no_training']``. Two calls of one
  module carry the same scopes; they are told apart as the separate connected pieces of that scope's nodes.

When the calls of one module cannot be told apart (the number of pieces is not the number of calls), none of
them is compared; their nodes count for the innermost call around all of them.

Fused modules: both exporters fold an eval BatchNorm into the Conv before it, and the node left computes
``bn(conv(x))``. The TorchScript exporter files that node under the conv (``/conv1/Conv``), the dynamo one
under the BN, so one of the two modules has no node. A call joins the call whose output it takes (that very
tensor, unchanged since: same object, same version counter) when one of the two has no node: with the
TorchScript exporter a module without node joins the one before it (the BN its conv), with the dynamo
exporter the one after it (the conv its BN). The pair is compared once, at the second module's output,
reported as that module with ``fused`` naming the other. Modules that export to nothing (Identity, an eval
Dropout) are fused the same way, correctly in either direction.

Tolerances: the caller's ``atol``/``rtol`` (None: :data:`bnfold.compare.DEFAULT_TOLERANCES` for the torch
tensor's dtype), applied to every intermediate as to the outputs, with the error relative to each tensor's own
scale. Not looser: the final output is the last call compared (the model itself), so with the same tolerances
a BN010 on the graph as written always finds a failing call, while looser ones could pass every intermediate
of a graph whose output fails. Not tighter: accumulated float32 rounding stays near 1e-6 of a tensor's scale
(a 40-conv ResNet-style graph, either exporter, agrees to 1.1e-6 at every module), far under the 1e-4
default and farther from what a real divergence gives at its source (a wrong weight or statistic: 1e-2 and
up).

Without scopes (a graph whose names and metadata were stripped or rewritten, a foreign converter's, one that
maps no node below the model itself), or when the scoped search finds nothing, calls are matched to tensors
by value instead, and the result says so (``matched by value``) and names the node's inputs:

1. Nothing is searched unless a graph output fails: then the graph does not compute what the model does.
2. Each call's output and input is matched to the graph's tensors of its shape that agree with it (torch the
   reference, the tolerances above): a tampered weight or statistic leaves every tensor before it exact. The
   tensors are bucketed by shape and sorted by mean; a tensor that passes is within ``max(atol, rtol *
   scale)`` of the torch tensor everywhere, so its mean and its largest magnitude are too, and only the few
   tensors in that window are compared in full (a binary search per call, not every pair of one shape).
   Constant torch tensors (all zeros after a ReLU) say nothing and are not matched.
3. A call that no tensor matches is computed inside a later node when a call taking its output (or one
   taking that one's, and so on) is matched: a conv whose BN the exporter folded into it.
4. The first other call in completion order whose input a tensor matches localizes the divergence: from
   those tensors, the first tensor computed from them, in graph order, of its output's shape (or that of the
   calls taking its output unchanged, fused in the same node), that matches nothing and feeds a failing
   output, is the one that should have matched. The culprit is the first node between the two (``span``
   when more than one); the module is the call that tensor is closest to (mean error relative to the
   call's scale), those before it ``fused``: a tampered BatchNormalization, or the Conv its BN was folded
   into (module the BN, fused with the conv).
5. A call whose input matches nothing either diverged before it, in ops of no module: the culprit is the
   first of the ops computing the first tensor of its input's shape that matches nothing (``before``).
6. Every module matched: the model's own ops, reached from the failing output as in the scoped search.

Matching by value cannot tell apart ops that torch has no tensor for (a Linear exported as MatMul and Add:
``span`` names both), and a module whose output the exporter fused with a functional op that follows it (not
a module: nothing rescues it) is named when anything after it diverges.

None means no call diverges: the graph as written computes what the eval model does (a BN010 then comes from
onnxruntime's graph optimisations, or from inputs other than these).

Limitations: every intermediate of one run is held in memory twice (torch and onnxruntime); compiled
submodules (TorchScript) have no hooks and are compared only as part of their parent; only the top-level
graph is searched (not If/Loop bodies, not ONNX functions, e.g. ``export_modules_as_functions=True``); a
module's first output tensor is the one compared (the model's own outputs are all compared, last).
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn
from torch.utils._pytree import tree_flatten

from bnfold.compare import OutputDiff, check_tolerance, compare_output, flatten_outputs, resolve_tolerances
from bnfold.errors import BnfoldError, first_line
from bnfold.inputs import dtype_name
from bnfold.onnx.graph import GraphIndex
from bnfold.runtime import run_model

__all__ = ["Divergence", "find_divergence"]

#: The metadata key in which the torch.export-based exporter lists a node's enclosing module calls.
NAME_SCOPES = "pkg.torch.onnx.name_scopes"
#: onnxruntime's session option naming the folder of external tensor data for a graph passed as bytes.
_EXTERNAL_DATA_FOLDER = "session.model_external_initializers_file_folder_path"
_SPAN_SHOWN = 4  # nodes of a span named in a message
_INPUTS_SHOWN = 6  # inputs of a node matched by value named in a message (a BatchNormalization has 5)
_REPEAT = re.compile(r"(.+)_(\d+)")  # the TorchScript exporter's suffix on a scope seen again: relu_1


@dataclass(frozen=True)
class Divergence:
    """Where the ONNX graph first stops computing what the eval model does."""

    onnx_node: str  # ONNX node label (bnfold.onnx.graph.node_labels: OpType#index when unnamed)
    op_type: str
    module: str  # dotted torch module path ("" the model itself)
    diff: OutputDiff  # that node's output compared with the module's output
    fused: tuple[str, ...] = ()  # modules the graph computes in the same node(s) (a Conv with its BN folded in)
    # Set when the input of module ``before`` already differed (``diff`` compares that input): the divergence
    # is in the ops before it, ``span`` (in graph order, when more than one), from the last tensors that agreed.
    before: str | None = None
    span: tuple[str, ...] = ()
    # Set when the graph carries no module scopes and the module was matched by value (module docstring): the
    # node's inputs are named, since its name and scope tell the user nothing.
    by_value: bool = False
    inputs: tuple[str, ...] = ()

    def message(self) -> str:
        """One line: ``first divergence at ONNX node /conv2/Conv (module bn2, fused with conv2): max abs ...``;
        matched by value: ``... at ONNX node Conv#2 (module bn2, fused with conv2, matched by value; inputs t1,
        w, b): max abs ...``."""
        where = f"module {self.module}" if self.module else "the model's own forward"
        if self.fused:
            where += f", fused with {', '.join(self.fused)}"
        if self.before is not None:
            where += f", before module {self.before}, whose input already differs"
        if self.by_value:
            where += ", matched by value"
        if self.span:
            where += f": one of {len(self.span)} ops {_listed(self.span, _SPAN_SHOWN)}"
        if self.inputs:
            where += f"; inputs {_listed(self.inputs, _INPUTS_SHOWN)}"
        return f"first divergence at ONNX node {self.onnx_node} ({where}): {self.diff.figure()}"


def _listed(names: tuple[str, ...], shown: int) -> str:
    return ", ".join(names[:shown]) + (", ..." if len(names) > shown else "")


def find_divergence(model_path: Path, torch_model: nn.Module, inputs: tuple[torch.Tensor, ...], *,
                    atol: float | None = None, rtol: float | None = None) -> Divergence | None:
    """The first ONNX node and torch module where the graph at ``model_path`` and ``torch_model`` disagree on
    ``inputs``; None when the graph's outputs agree (module docstring: method, tolerances, the value fallback).

    ``torch_model`` runs as it is: pass it in the mode it was exported and compared in (eval). Raises
    BnfoldError when onnxruntime cannot run the graph with its intermediate tensors as outputs.
    """
    check_tolerance("atol", atol)
    check_tolerance("rtol", rtol)
    model_path = Path(model_path)
    calls, outputs = _record_calls(torch_model, inputs)
    model = onnx.load(str(model_path), load_external_data=False)
    graph = GraphIndex.of(model.graph)
    exporter = _map_nodes(graph, calls)
    arrays = _run_all(model, inputs, graph, model_path.parent)
    flat = flatten_outputs(outputs)
    if exporter is not None and any(c.nodes for c in calls if c.parent is not None):
        found = _Search(calls, graph, arrays, atol, rtol).first(exporter == "ts", flat)
        if found is not None:
            return found
    return _ValueSearch(calls, graph, arrays, atol, rtol).first(flat)


# -- torch side ----------------------------------------------------------------------------------------------
@dataclass(eq=False)
class _Call:
    """One call of one module: what went in and came out, and (once mapped) the ONNX nodes it owns."""

    name: str  # dotted module path, "" for the model itself
    parent: _Call | None
    input: torch.Tensor | None = None  # first tensor argument, cloned on entry
    output: torch.Tensor | None = None  # first tensor of the output, cloned on exit
    producer: _Call | None = None  # the call whose output is this call's first input (same tensor, unchanged)
    nodes: set[int] = field(default_factory=set)  # indices of the ONNX nodes of its scope, nested calls included
    ambiguous: bool = False  # its module was called again and the calls' nodes cannot be told apart

    def path(self) -> list[_Call]:
        """The enclosing calls, outermost first, this one last."""
        chain, call = [], self
        while call is not None:
            chain.append(call)
            call = call.parent
        return chain[::-1]

    @property
    def mapped(self) -> bool:
        return bool(self.nodes) or self.ambiguous


def _first_tensor(value: Any) -> torch.Tensor | None:
    return next((t for t in tree_flatten(value)[0] if isinstance(t, torch.Tensor)), None)


def _version(tensor: torch.Tensor) -> int:
    """The tensor's in-place version counter (bumped by ``x += 1``, ``relu_``); -1 for inference tensors."""
    try:
        return tensor._version
    except RuntimeError:  # inference-mode tensors keep no counter
        return -1


class _Recorder:
    """Forward hooks on every module: each call's first input and output, in completion order.

    Outputs are kept (not only cloned) while the model runs, so that no tensor id is reused: a call's first
    input is the output of an earlier call only when it is that very object, at the same version.
    """

    def __init__(self) -> None:
        self.calls: list[_Call] = []  # completion order: a call comes after every call inside it
        self._stack: list[_Call] = []
        self._made: dict[int, tuple[torch.Tensor, int, _Call]] = {}  # id(output) -> (output, version, call)

    @contextmanager
    def hooked(self, model: nn.Module) -> Iterator[_Recorder]:
        handles = []
        for name, module in model.named_modules():
            if isinstance(module, torch.jit.ScriptModule):
                continue  # compiled: no Python hooks
            handles.append(module.register_forward_pre_hook(
                lambda m, args, kwargs, name=name: self._enter(name, (args, kwargs)), with_kwargs=True))
            handles.append(module.register_forward_hook(lambda m, args, out: self._exit(out)))
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()
            self._made.clear()

    def _enter(self, name: str, args: Any) -> None:
        call = _Call(name, self._stack[-1] if self._stack else None)
        first = _first_tensor(args)
        if first is not None:
            call.input = first.detach().clone()
            made = self._made.get(id(first))
            if made is not None and made[0] is first and made[1] == _version(first):
                call.producer = made[2]
        self._stack.append(call)

    def _exit(self, output: Any) -> None:
        call = self._stack.pop()
        first = _first_tensor(output)
        if first is not None:
            call.output = first.detach().clone()
            self._made[id(first)] = (first, _version(first), call)
        self.calls.append(call)


def _record_calls(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> tuple[list[_Call], Any]:
    """Every module call in completion order, and the model's output."""
    with _Recorder().hooked(model) as recorder:
        outputs = run_model(model, inputs)
    return recorder.calls, outputs


# -- ONNX side -----------------------------------------------------------------------------------------------
def _expose_all(model: onnx.ModelProto, graph: GraphIndex) -> None:
    """Make every node output a graph output, typed where shape inference knows the type (shape left open:
    onnxruntime checks a declared shape, and the inferred ones may be symbolic)."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model).graph.value_info
    except Exception:  # noqa: BLE001 - custom ops and odd graphs defeat inference; untyped outputs still run
        inferred = []
    types = {info.name: info.type for info in inferred}
    for name in graph.producer:
        if name in graph.outputs:
            continue
        info = model.graph.output.add(name=name)
        if name in types:
            info.type.CopyFrom(types[name])
            if info.type.HasField("tensor_type"):
                info.type.tensor_type.ClearField("shape")


def _run_all(model: onnx.ModelProto, inputs: tuple[torch.Tensor, ...], graph: GraphIndex,
             base_dir: Path) -> dict[str, np.ndarray]:
    """Every tensor of one run as written (no graph optimisations), the fed inputs included, by name."""
    import onnxruntime as ort  # slow to import; only a diagnosis needs it in this process

    _expose_all(model, graph)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.add_session_config_entry(_EXTERNAL_DATA_FOLDER, str(base_dir.resolve()))
    feeds = {name: tensor.detach().cpu().numpy() for name, tensor in zip(graph.fed, inputs)}
    try:
        session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        names = [o.name for o in session.get_outputs()]
        return {**feeds, **dict(zip(names, session.run(names, feeds)))}
    except Exception as exc:  # onnxruntime raises its own types; the user needs the first line
        raise BnfoldError(f"onnxruntime could not run the graph with its intermediate tensors as outputs: "
                          f"{type(exc).__name__}: {first_line(exc, 300)}",
                          "the diagnosis needs the graph to run with optimisations off; run it in onnxruntime "
                          "directly (ORT_DISABLE_ALL) to see why") from exc


# -- mapping nodes to calls ----------------------------------------------------------------------------------
def _unqualified(name: str) -> str:
    """The TorchScript exporter's name for a module in a scope: from the last non-numeric atom of its path."""
    atoms = name.split(".")
    for i in range(len(atoms) - 1, -1, -1):
        if not atoms[i].isnumeric():
            return ".".join(atoms[i:])
    return name


def _call_keys(call: _Call) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The scope a call's nodes carry: (TorchScript exporter, dynamo exporter)."""
    names = [c.name for c in call.path()]
    return ("ts", *(_unqualified(n) for n in names if n)), ("dynamo", *names)


def _node_scope(node: onnx.NodeProto) -> tuple[str, ...] | None:
    """The scope a node carries, keyed like :func:`_call_keys`; None when it carries none."""
    for prop in node.metadata_props:
        if prop.key == NAME_SCOPES:
            try:
                scopes = ast.literal_eval(prop.value)
            except (ValueError, SyntaxError):
                return None
            return ("dynamo", *scopes[:-1]) if isinstance(scopes, list) and scopes else None
    if node.name.startswith("/"):
        return ("ts", *node.name[1:].split("/")[:-1])
    return None


def _resolve(key: tuple[str, ...], keys: dict[tuple[str, ...], list[_Call]]) -> tuple[tuple[str, ...], int] | None:
    """The call key a node's scope names, with its repeat index: ``relu_1`` is the second call of ``relu``."""
    if key in keys:
        return key, 0
    match = _REPEAT.fullmatch(key[-1]) if key[0] == "ts" and len(key) > 1 else None
    if match and (*key[:-1], match[1]) in keys:
        return (*key[:-1], match[1]), int(match[2])
    return None


def _pieces(nodes: list[int], graph: GraphIndex) -> list[list[int]]:
    """``nodes`` split into connected pieces (by tensors passed between them), ordered by their first node."""
    root = {i: i for i in nodes}

    def find(i: int) -> int:
        while root[i] != i:
            root[i] = root[root[i]]
            i = root[i]
        return i

    for i in nodes:
        for name in graph.nodes[i].input:
            if graph.producer.get(name) in root:
                root[find(i)] = find(graph.producer[name])
    pieces: dict[int, list[int]] = {}
    for i in sorted(nodes):
        pieces.setdefault(find(i), []).append(i)
    return sorted(pieces.values(), key=lambda piece: piece[0])


def _innermost_common(calls: list[_Call]) -> _Call:
    paths = [c.path() for c in calls]
    common = paths[0][0]
    for level in zip(*paths):
        if any(c is not level[0] for c in level):
            break
        common = level[0]
    return common


def _map_nodes(graph: GraphIndex, calls: list[_Call]) -> str | None:
    """Give every call the indices of the nodes of its scope, nested calls included (module docstring).

    Returns the exporter whose scopes most nodes carry ("ts" or "dynamo"), None when no node maps.
    """
    keys: dict[tuple[str, ...], list[_Call]] = {}  # scope key -> its calls, in the order they started
    for call in _start_order(calls):
        for key in _call_keys(call):
            keys.setdefault(key, []).append(call)
    by_scope: dict[tuple[str, ...], dict[int, list[int]]] = {}
    for index, node in enumerate(graph.nodes):
        scope = _node_scope(node)
        resolved = _resolve(scope, keys) if scope else None
        if resolved:
            by_scope.setdefault(resolved[0], {}).setdefault(resolved[1], []).append(index)
    for key, repeats in by_scope.items():
        owners = keys[key]
        pieces = [repeats[r] for r in sorted(repeats)]
        if len(owners) > 1 and len(pieces) == 1 and key[0] == "dynamo":
            pieces = _pieces(pieces[0], graph)
        if len(pieces) != len(owners):
            for call in owners:
                call.ambiguous = True
            pieces, owners = [[i for piece in pieces for i in piece]], [_innermost_common(owners)]
        for owner, piece in zip(owners, pieces):
            for call in owner.path():
                call.nodes.update(piece)
    if by_scope:  # the model itself owns every node, those carrying no scope included
        for call in calls:
            if call.parent is None:
                call.nodes.update(range(len(graph.nodes)))
    counts = {kind: sum(len(n) for key, r in by_scope.items() if key[0] == kind for n in r.values())
              for kind in ("ts", "dynamo")}
    return max(counts, key=counts.get) if any(counts.values()) else None


def _start_order(calls: list[_Call]) -> list[_Call]:
    """Calls in the order they started (parents before the calls inside them), from completion order."""
    children: dict[_Call, list[_Call]] = {}
    roots = []
    for call in calls:  # completion order lists siblings in call order
        (children.setdefault(call.parent, []) if call.parent else roots).append(call)

    def walk(call: _Call) -> Iterable[_Call]:
        yield call
        for child in children.get(call, []):
            yield from walk(child)

    return [c for root in roots for c in walk(root)]


# -- comparing -----------------------------------------------------------------------------------------------
def _groups(calls: list[_Call], fused_first: bool) -> list[list[_Call]]:
    """Calls to compare, in completion order, each with the calls fused into it (module docstring), first first.

    A call joins the group of the call whose output it takes when one of the two has no node. The exporter
    decides which: the TorchScript exporter files a fused node under its first module (``fused_first``: a
    BN without node joins its conv), the dynamo exporter under its last (a conv without node waits for its
    BN). Modules that export to nothing (Identity, eval Dropout) are right either way.
    """
    group_of: dict[_Call, list[_Call]] = {}
    taken: set[_Call] = set()  # calls already fused into a later one
    for call in calls:
        before = call.producer
        joined = group_of.get(before, []) if before is not None and before not in taken else []
        mapped = any(c.mapped for c in joined)
        group = [call]
        if (joined and not (mapped and call.mapped) and (fused_first or not mapped)
                and not any(c.ambiguous for c in (*joined, call))
                and before.output is not None and call.output is not None
                and before.output.shape == call.output.shape):
            group = joined + [call]
            taken.add(before)
        group_of[call] = group
    return [group_of[c] for c in calls if c not in taken]


def _leaving(graph: GraphIndex, nodes: set[int], name: str) -> bool:
    """Whether tensor ``name`` is read outside ``nodes`` (or is a graph output)."""
    return name in graph.outputs or any(i not in nodes for i, _ in graph.readers.get(name, ()))


def _floating(array: np.ndarray | None, shape: tuple[int, ...] | None = None) -> bool:
    return (array is not None and np.issubdtype(array.dtype, np.floating)
            and (shape is None or array.shape == shape))


def _output_node(graph: GraphIndex, arrays: dict[str, np.ndarray], nodes: set[int], shape: tuple[int, ...]
                 ) -> tuple[int, str] | None:
    """The node (and tensor) standing for a call's output: the last of ``nodes`` with an output of ``shape``,
    one read outside the call first."""
    found = [(_leaving(graph, nodes, name), index, name) for index in sorted(nodes)
             for name in graph.nodes[index].output if _floating(arrays.get(name), shape)]
    return max(found)[1:] if found else None


def _input_tensor(graph: GraphIndex, arrays: dict[str, np.ndarray], nodes: set[int], shape: tuple[int, ...]
                  ) -> str | None:
    """The tensor entering ``nodes`` that stands for the call's input: the first, in node order, computed
    outside them (or fed), of ``shape``; constants are not inputs."""
    for index in sorted(nodes):
        for name in graph.nodes[index].input:
            source = graph.producer.get(name)
            if source in nodes or (source is not None and graph.nodes[source].op_type == "Constant"):
                continue
            if _floating(arrays.get(name), shape):
                return name
    return None


@dataclass
class _Search:
    """One diagnosis: the torch calls, the graph and every tensor of its run, and the tolerances."""

    calls: list[_Call]  # completion order
    graph: GraphIndex
    arrays: dict[str, np.ndarray]
    atol: float | None
    rtol: float | None
    agreed: set[int] = field(default_factory=set)  # nodes of the groups that passed so far

    def first(self, fused_first: bool, outputs: dict[str, Any]) -> Divergence | None:
        """Every module in completion order, then the model's outputs (``outputs``: flattened, by name)."""
        for group in _groups(self.calls, fused_first):
            diverged = self.compare(group)
            if diverged is not None:
                return diverged
        return self.compare_outputs(outputs)

    def compare(self, group: list[_Call]) -> Divergence | None:
        """The divergence this group shows, or None when it passes or cannot be compared."""
        first, last = group[0], group[-1]
        if last.parent is None or last.ambiguous or last.output is None or not last.output.is_floating_point():
            return None  # the model itself is compared output by output, last
        nodes = set().union(*(c.nodes for c in group))
        found = _output_node(self.graph, self.arrays, nodes, tuple(last.output.shape))
        if found is None:
            return None
        index, tensor = found
        diff = compare_output(tensor, last.output, self.arrays[tensor], self.atol, self.rtol)
        if diff.passed:
            self.agreed |= nodes
            return None
        return self.upstream(first, last, nodes) or self.divergence(
            index, last.name, diff, fused=tuple(c.name for c in group[:-1]))

    def upstream(self, first: _Call, last: _Call, nodes: set[int]) -> Divergence | None:
        """When the group's input already differs: the ops between the tensors that last agreed and it."""
        if first.input is None or not first.input.is_floating_point():
            return None
        tensor = _input_tensor(self.graph, self.arrays, nodes, tuple(first.input.shape))
        if tensor is None:
            return None
        return self.reached(tensor, compare_output(tensor, first.input, self.arrays[tensor], self.atol, self.rtol),
                            before=last.name)

    def compare_outputs(self, outputs: dict[str, Any]) -> Divergence | None:
        """Every module agreed: the first model output that differs, reached through the model's own ops."""
        for name, value in zip(self.graph.outputs, outputs.values()):
            if isinstance(value, torch.Tensor) and value.is_floating_point() and name in self.arrays:
                diverged = self.reached(name, compare_output(name, value, self.arrays[name], self.atol, self.rtol))
                if diverged is not None:
                    return diverged
        return None

    def reached(self, tensor: str, diff: OutputDiff, before: str | None = None) -> Divergence | None:
        """None when ``diff`` passed or ``tensor`` is fed as is; else the first node of the ops computing it."""
        if diff.passed or tensor not in self.graph.producer:
            return None
        span = self.span(self.graph.producer[tensor])
        names = tuple(self.graph.labels[i] for i in span)
        return self.divergence(span[0], self.owner(span[0]), diff, before=before, span=names if len(names) > 1 else ())

    def span(self, source: int) -> list[int]:
        """Node ``source`` and the nodes it reads from, back to nodes of groups that agreed, to fed inputs and
        constants, in graph order. Only floating-point tensors are followed (not shape arithmetic)."""
        seen: set[int] = set()
        todo = [source]
        while todo:
            index = todo.pop()
            if index in seen:
                continue
            seen.add(index)
            for name in self.graph.nodes[index].input:
                producer = self.graph.producer.get(name)
                if (producer is not None and producer not in self.agreed and _floating(self.arrays.get(name))
                        and self.graph.nodes[producer].op_type != "Constant"):
                    todo.append(producer)
        return sorted(seen)

    def owner(self, index: int) -> str:
        """The innermost call whose scope holds node ``index`` ("" when none does: the model's own)."""
        holders = [c for c in self.calls if index in c.nodes]
        return max(holders, key=lambda c: len(c.path())).name if holders else ""

    def divergence(self, index: int, module: str, diff: OutputDiff, **extra: Any) -> Divergence:
        return Divergence(self.graph.labels[index], self.graph.nodes[index].op_type, module, diff, **extra)


# -- matching by value (graphs without module scopes) ------------------------------------------------------------
def _fingerprint(values: np.ndarray) -> tuple[float, float]:
    """(mean, max magnitude), in float64: a tensor within a bound of another has both within that bound."""
    return float(np.mean(values, dtype=np.float64)), float(np.max(np.abs(values)))


def _informative(tensor: torch.Tensor | None) -> bool:
    """Whether matching ``tensor`` by value says anything: a float tensor of more than one value, all finite
    (a constant one, all zeros after a ReLU, matches too much; a non-finite one matches nothing)."""
    if tensor is None or not tensor.is_floating_point() or tensor.numel() < 2:
        return False
    values = tensor.detach().to("cpu", torch.float64)
    return bool(torch.isfinite(values).all()) and bool(values.max() > values.min())


@dataclass
class _Tensors:
    """The graph's floating-point tensors of one run (fed inputs and node outputs, Constant outputs left out),
    bucketed by shape and sorted by mean within a bucket, so that finding the ones that match a torch tensor
    costs a binary search and a look at the few whose mean and magnitude are close enough, not a comparison
    with every tensor of its shape."""

    arrays: dict[str, np.ndarray]
    order: dict[str, int]  # name -> position in graph order (fed inputs first)
    buckets: dict[tuple[int, ...], tuple[np.ndarray, np.ndarray, list[str]]]  # shape -> (means, magnitudes, names)

    @classmethod
    def of(cls, graph: GraphIndex, arrays: dict[str, np.ndarray]) -> _Tensors:
        names = [*graph.fed, *(name for node in graph.nodes if node.op_type != "Constant" for name in node.output)]
        order = {name: position for position, name in enumerate(dict.fromkeys(names))}
        rows: dict[tuple[int, ...], list[tuple[float, float, str]]] = {}
        for name in order:
            if _floating(arrays.get(name)) and arrays[name].size:
                mean, magnitude = _fingerprint(arrays[name])
                if np.isfinite(mean) and np.isfinite(magnitude):  # a NaN or Inf fails every comparison
                    rows.setdefault(arrays[name].shape, []).append((mean, magnitude, name))
        buckets = {}
        for shape, bucket in rows.items():
            bucket.sort()
            buckets[shape] = (np.array([r[0] for r in bucket]), np.array([r[1] for r in bucket]),
                              [r[2] for r in bucket])
        return cls(arrays, order, buckets)

    def matching(self, ref: torch.Tensor, atol: float | None, rtol: float | None) -> list[str]:
        """The tensors that agree with ``ref`` (ref as reference, :func:`compare_output`), in graph order.

        An element passes within ``max(atol, rtol * scale)``, so a passing tensor's mean and largest magnitude
        are each within that bound of ``ref``'s: only those are compared in full.
        """
        bucket = self.buckets.get(tuple(ref.shape))
        if bucket is None:
            return []
        means, magnitudes, names = bucket
        mean, scale = _fingerprint(ref.detach().to("cpu", torch.float64).numpy())
        ref_atol, ref_rtol = resolve_tolerances(dtype_name(ref.dtype), atol, rtol)
        bound = max(ref_atol, ref_rtol * scale) + 1e-9 * scale  # float64 rounding of the two fingerprints
        low, high = np.searchsorted(means, mean - bound, "left"), np.searchsorted(means, mean + bound, "right")
        found = [names[i] for i in range(low, high) if abs(magnitudes[i] - scale) <= bound
                 and compare_output(names[i], ref, self.arrays[names[i]], atol, rtol).passed]
        return sorted(found, key=self.order.__getitem__)


@dataclass
class _ValueSearch:
    """The diagnosis of a graph whose nodes map to no module call: module calls matched to tensors by value
    (module docstring)."""

    calls: list[_Call]  # completion order
    graph: GraphIndex
    arrays: dict[str, np.ndarray]
    atol: float | None
    rtol: float | None

    def first(self, outputs: dict[str, Any]) -> Divergence | None:
        """The first call that no tensor matches while one matches its input; else the model's own ops."""
        failing = [name for name, value in zip(self.graph.outputs, outputs.values())
                   if isinstance(value, torch.Tensor) and value.is_floating_point() and name in self.arrays
                   and not compare_output(name, value, self.arrays[name], self.atol, self.rtol).passed]
        if not failing:
            return None  # the graph computes what the model does: nothing to find
        tensors = _Tensors.of(self.graph, self.arrays)
        modules = [c for c in self.calls if c.parent is not None and _informative(c.output)]
        matched = {c: tensors.matching(c.output, self.atol, self.rtol) for c in modules}
        entering = {c: tensors.matching(c.input, self.atol, self.rtol) for c in modules if _informative(c.input)}
        agreed = set().union(*matched.values(), *entering.values())
        search = _Search(self.calls, self.graph, self.arrays, self.atol, self.rtol,
                         agreed={self.graph.producer[t] for t in agreed if t in self.graph.producer})
        upstream = _upstream(self.graph, failing)
        consumers = _consumers(modules)
        rescued = _rescued(modules, matched, consumers)
        for call in modules:
            if matched[call] or rescued[call] or call not in entering:
                continue
            found = (self.localize(_chain(call, consumers), entering[call], agreed, upstream, search)
                     if entering[call] else self.before(call, agreed, upstream, search))
            if found is not None:
                return self.named(found)
        found = search.compare_outputs(outputs)  # every module agreed: the model's own ops
        return self.named(found) if found is not None else None

    def named(self, found: Divergence) -> Divergence:
        """``found``, marked as matched by value, with its node's inputs."""
        node = self.graph.nodes[self.graph.labels.index(found.onnx_node)]
        return replace(found, by_value=True, inputs=tuple(node.input))

    def before(self, call: _Call, agreed: set[str], upstream: list[int], search: _Search) -> Divergence | None:
        """The input of ``call`` already matches nothing: the divergence is in the ops before it, up to the first
        tensor of its input's shape that matches nothing and feeds a failing output."""
        shape = tuple(call.input.shape)
        target = next((name for index in upstream for name in self.graph.nodes[index].output
                       if name not in agreed and _floating(self.arrays.get(name), shape)), None)
        if target is None:
            return None
        diff = compare_output(target, call.input, self.arrays[target], self.atol, self.rtol)
        return search.reached(target, diff, before=call.name)

    def localize(self, chain: list[_Call], starts: list[str], agreed: set[str], upstream: list[int],
                 search: _Search) -> Divergence | None:
        """The divergence inside ``chain[0]`` (``chain``: it and the calls fused after it), whose input is
        ``starts``: the first tensor computed from them, of a chain call's output shape, that matches nothing
        and feeds a failing output; the first node between ``starts`` and it; the chain call it is closest to."""
        shapes = {tuple(c.output.shape) for c in chain}
        live, reach = set(starts), set()
        target = None
        for index in upstream:  # graph order: a node is reached once any input is
            node = self.graph.nodes[index]
            if not any(name in live for name in node.input):
                continue
            reach.add(index)
            live.update(node.output)
            target = target or next((name for name in node.output if name not in agreed
                                     and _floating(self.arrays.get(name)) and self.arrays[name].shape in shapes), None)
        if target is None:
            return None
        span = [i for i in search.span(self.graph.producer[target]) if i in reach]
        diffs = [(compare_output(target, c.output, self.arrays[target], self.atol, self.rtol), position)
                 for position, c in enumerate(chain) if tuple(c.output.shape) == self.arrays[target].shape]
        diff, position = min(diffs, key=lambda d: (d[0].mean_abs / d[0].scale if d[0].scale > 0 else np.inf, d[1]))
        names = tuple(self.graph.labels[i] for i in span)
        return search.divergence(span[0], chain[position].name, diff, fused=tuple(c.name for c in chain[:position]),
                                 span=names if len(names) > 1 else ())


def _upstream(graph: GraphIndex, tensors: list[str]) -> list[int]:
    """The nodes that ``tensors`` are computed from, themselves included, in graph order."""
    seen: set[int] = set()
    todo = [graph.producer[t] for t in tensors if t in graph.producer]
    while todo:
        index = todo.pop()
        if index not in seen:
            seen.add(index)
            todo.extend(graph.producer[n] for n in graph.nodes[index].input if n in graph.producer)
    return sorted(seen)


def _consumers(calls: list[_Call]) -> dict[_Call, list[_Call]]:
    """The calls that take each call's output as their first input, unchanged, in completion order."""
    consumers: dict[_Call, list[_Call]] = {}
    for call in calls:
        if call.producer is not None:
            consumers.setdefault(call.producer, []).append(call)
    return consumers


def _rescued(calls: list[_Call], matched: dict[_Call, list[str]], consumers: dict[_Call, list[_Call]]
             ) -> dict[_Call, bool]:
    """Whether a call's output is computed correctly inside a later node: a call that takes it, or one taking
    that one's output, and so on, is matched (a Conv whose BN the exporter folded into it: the conv's output
    exists in no tensor, the BN's does)."""
    rescued: dict[_Call, bool] = {}
    for call in reversed(calls):  # a consumer completes after its producer
        rescued[call] = any(matched.get(c) or rescued.get(c, False) for c in consumers.get(call, ()))
    return rescued


def _chain(call: _Call, consumers: dict[_Call, list[_Call]]) -> list[_Call]:
    """``call`` and the calls that may be computed in the same nodes: each the first that takes the previous
    one's output, of the same shape (a conv, then the BN folded into it)."""
    chain = [call]
    while True:
        following = [c for c in consumers.get(chain[-1], ()) if c.output is not None
                     and tuple(c.output.shape) == tuple(call.output.shape)]
        if not following:
            return chain
        chain.append(following[0])
