"""Discovery on a TorchScript module's inlined ``forward`` graph.

Parameters are found by following ``prim::GetAttr`` chains from ``self``, so every op knows the dotted path
of the tensors it reads. BN calls inside a scripted ``forward`` read a ``training`` attribute at run time;
the model is put in eval mode first, and every fold is checked numerically afterwards.
"""

from __future__ import annotations

from typing import Any

import torch

from bnfold.discover.graph import Discovery, Node, pair
from bnfold.layers import BNRef, LayerRef, get_tensor

_CONV = {"aten::conv1d", "aten::conv2d", "aten::conv3d"}
_CONV_T = {"aten::conv_transpose1d", "aten::conv_transpose2d", "aten::conv_transpose3d"}
_LINEAR = {"aten::linear"}
_CONVOLUTION = {"aten::_convolution", "aten::convolution"}


def _attr_path(value: Any) -> str | None:
    """``self.layer1.conv.weight`` -> ``"layer1.conv.weight"``; None when not a chain of attributes."""
    names = []
    while value.node().kind() == "prim::GetAttr":
        names.append(value.node().s("name"))
        value = value.node().input()
    if value.node().kind() != "prim::Param" or not names:
        return None
    return ".".join(reversed(names))


def _constant(value: Any) -> Any:
    return value.toIValue() if value.node().kind() in ("prim::Constant", "prim::ListConstruct") else None


def _int_list(value: Any) -> list[int] | None:
    node = value.node()
    if node.kind() == "prim::ListConstruct":
        items = [_constant(v) for v in node.inputs()]
        return items if all(isinstance(i, int) for i in items) else None
    const = _constant(value)
    return list(const) if isinstance(const, (list, tuple)) else None


def _holds_tensor(module: torch.jit.ScriptModule, path: str) -> bool:
    try:
        get_tensor(module, path)
    except (AttributeError, KeyError):
        return False
    return True


def _is_tensor(value: Any) -> bool:
    return isinstance(value.type(), torch._C.TensorType)


def _layer(node: Any, module: torch.jit.ScriptModule) -> LayerRef | None:
    kind = node.kind()
    inputs = list(node.inputs())
    if kind not in _CONV | _CONV_T | _LINEAR | _CONVOLUTION:
        return None
    weight = _attr_path(inputs[1])
    bias_value = inputs[2]
    bias = _attr_path(bias_value)
    if bias is not None and not _holds_tensor(module, bias):
        bias = None  # an Optional[Tensor] attribute that is None
        bias_value = None
    if weight is None or (bias_value is not None and bias is None and not isinstance(bias_value.type(), torch._C.NoneType)):
        return None
    if kind in _LINEAR:
        return LayerRef(weight.rpartition(".")[0], "linear", weight, bias)
    if kind in _CONVOLUTION:
        layer_kind = "conv_transpose" if _constant(inputs[6]) else "conv"
        padding, groups = _int_list(inputs[4]), _constant(inputs[8])
    elif kind in _CONV_T:
        layer_kind, padding, groups = "conv_transpose", _int_list(inputs[4]), _constant(inputs[6])
    else:
        layer_kind = "conv"
        padding = _int_list(inputs[4]) if inputs[4].type().kind() != "StringType" else None
        groups = _constant(inputs[6])
        if padding is None and _constant(inputs[4]) == "valid":
            padding = [0]
    if not isinstance(groups, int):
        return None
    padded = padding is None or any(p != 0 for p in padding)
    return LayerRef(weight.rpartition(".")[0], layer_kind, weight, bias, groups=groups, padded=padded)


def _bn(node: Any) -> BNRef | None:
    if node.kind() != "aten::batch_norm":
        return None
    inputs = list(node.inputs())  # input, weight, bias, running_mean, running_var, training, momentum, eps, cudnn
    mean, var = _attr_path(inputs[3]), _attr_path(inputs[4])
    eps = _constant(inputs[7])
    training = inputs[5]
    # ``training`` is either a constant or the module's own ``training`` attribute (False after eval()).
    forced = _constant(training) is True
    return BNRef(
        name=(mean or var or "batch_norm").rpartition(".")[0],
        mean=mean,
        var=var,
        weight=_attr_path(inputs[1]),
        bias=_attr_path(inputs[2]),
        eps=float(eps) if isinstance(eps, float) else 1e-5,
        batch_stats=mean is None or var is None or forced or not isinstance(eps, float),
    )


def discover(module: torch.jit.ScriptModule, example_inputs: tuple[Any, ...]) -> Discovery:
    graph = module.inlined_graph
    keys: dict[Any, int] = {}
    nodes: dict[int, Node] = {}
    graph_outputs = set()
    for out in graph.outputs():
        graph_outputs.add(out.debugName())
        if out.node().kind() in ("prim::TupleConstruct", "prim::ListConstruct", "prim::DictConstruct"):
            graph_outputs.update(v.debugName() for v in out.node().inputs())
    calls: dict[str, int] = {}
    for ts_node in graph.nodes():  # the top-level block: BN and conv calls of inlined modules live here
        outputs = [o for o in ts_node.outputs() if _is_tensor(o)]
        if not outputs or ts_node.kind() in ("prim::GetAttr", "prim::Constant"):
            continue
        node = Node(key=len(nodes), label=ts_node.kind().removeprefix("aten::"))
        node.layer, node.bn = _layer(ts_node, module), _bn(ts_node)
        for ref in (node.layer, node.bn):
            if ref is not None:
                node.label = ref.name
                calls[ref.name] = calls.get(ref.name, 0) + 1
        tensor_inputs = [v for v in ts_node.inputs() if _is_tensor(v)]
        if tensor_inputs:
            node.input = keys.get(tensor_inputs[0].debugName())
            node.in_rank = tensor_inputs[0].type().dim()
        for v in tensor_inputs:
            src = keys.get(v.debugName())
            if src is not None and node.key not in nodes[src].users:
                nodes[src].users.append(node.key)
        for o in outputs:
            keys[o.debugName()] = node.key
            node.is_output |= o.debugName() in graph_outputs
        nodes[node.key] = node
    hidden = Node(key=-1, label="code inside a branch or loop")
    for ts_node in graph.nodes():
        node = nodes.get(keys.get(next(iter(ts_node.outputs())).debugName(), -2)) if ts_node.outputsSize() else None
        if node is None or (node.bn or node.layer) is None:
            continue
        node.calls = calls[(node.bn or node.layer).name]
        # Uses nested in prim::If / prim::Loop blocks are not top-level nodes: count them as other users.
        data_uses = sum(1 for o in ts_node.outputs() for u in o.uses()
                        if any(_is_tensor(v) for v in u.user.outputs()) or u.user.kind() in ("prim::If", "prim::Loop"))
        if data_uses > len(node.users):
            node.users.append(hidden.key)
    nodes[hidden.key] = hidden
    return pair(nodes, "torchscript")
