"""Discovery on a torch.fx graph: symbolic tracing (static, independent of the input values).

BN-like modules and Conv/Linear modules are kept as leaves, so a BN subclass with its own ``forward``
stays one node. ``F.batch_norm`` calls whose statistics are module attributes show up as
``call_function`` nodes reading ``get_attr`` nodes, and fold too.
"""

from __future__ import annotations

import operator
from collections import Counter
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from bnfold.discover.graph import Discovery, Factor, Node, pair
from bnfold.discover.reasons import Reason
from bnfold.discover.rules import per_channel
from bnfold.layers import BNRef, LayerRef, bn_ref, conv_geometry, is_bn_module, producer_ref

_aten = torch.ops.aten
# Argument names of each BatchNorm call, positionally: Python's F.batch_norm and aten's differ.
_F_BN_ARGS = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")
_ATEN_BN_ARGS = ("input", "weight", "bias", "running_mean", "running_var", "training", "momentum", "eps")
_ATEN_BN_INFER_ARGS = ("input", "weight", "bias", "running_mean", "running_var", "momentum", "eps")
_BN_CALLS: dict[Any, tuple[str, ...]] = {
    F.batch_norm: _F_BN_ARGS,
    torch.batch_norm: _ATEN_BN_ARGS,
    _aten.batch_norm.default: _ATEN_BN_ARGS,
    _aten._native_batch_norm_legit_no_training.default: _ATEN_BN_INFER_ARGS,  # returns (out, mean, invstd)
}
_CONV_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_CONV_T_ARGS = ("input", "weight", "bias", "stride", "padding", "output_padding", "groups", "dilation")
_CONVOLUTION_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "transposed", "output_padding",
                     "groups")
_LAYER_CALLS: dict[Any, tuple[str, tuple[str, ...]]] = {
    F.linear: ("linear", ("input", "weight", "bias")),
    _aten.linear.default: ("linear", ("input", "weight", "bias")),
    **{f: ("conv", _CONV_ARGS) for f in (F.conv1d, F.conv2d, F.conv3d, _aten.conv1d.default, _aten.conv2d.default,
                                          _aten.conv3d.default, _aten.conv1d.padding, _aten.conv2d.padding,
                                          _aten.conv3d.padding)},
    **{f: ("conv_transpose", _CONV_T_ARGS) for f in (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d,
                                                      _aten.conv_transpose1d.default, _aten.conv_transpose2d.input,
                                                      _aten.conv_transpose3d.input)},
    _aten.convolution.default: ("convolution", _CONVOLUTION_ARGS),
}
# Sums and concatenations, for the structural rules (:mod:`bnfold.discover.rules`).
_ADDS = {operator.add, operator.iadd, torch.add, _aten.add.Tensor, _aten.add_.Tensor, "add", "add_", "__add__",
         "__iadd__"}
_CATS = {torch.cat, torch.concat, torch.concatenate, _aten.cat.default, _aten.concat.default,
         _aten.concatenate.default}
_SUBS = {operator.sub, operator.isub, torch.sub, _aten.sub.Tensor, _aten.sub_.Tensor, "sub", "sub_", "__sub__",
         "__isub__"}
_MULS = {operator.mul, operator.imul, torch.mul, _aten.mul.Tensor, _aten.mul_.Tensor, "mul", "mul_", "__mul__",
         "__imul__"}
# Ops that only rearrange a constant (a layer scale's view(1, -1, 1, 1)): its values stay in order.
_RESHAPES = {"view", "reshape", "unsqueeze", torch.reshape, torch.unsqueeze, _aten.view.default,
             _aten.reshape.default, _aten.unsqueeze.default, _aten._unsafe_view.default}


class _LeafTracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return is_bn_module(m) or producer_ref(qualname, m) is not None or super().is_leaf_module(m, qualname)

#: Dropout modules, and dropout calls (their ``training``/``train`` argument: name, position, default): not
#: training, each computes its input, so a BN after conv -> dropout folds through it.
_DROPOUTS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)
_DROPOUT_CALLS: dict[Any, tuple[str, int, bool]] = {
    **{f: ("training", 2, True) for f in (F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout,
                                          F.feature_alpha_dropout)},
    **{f: ("train", 2, False) for f in (_aten.dropout.default, _aten.feature_dropout.default,
                                        _aten.alpha_dropout.default, _aten.feature_alpha_dropout.default)},
}


def _dropout_training(fx_node: fx.Node) -> bool:
    """Whether a dropout call may be random: its flag, unless it is a constant False."""
    name, position, default = _DROPOUT_CALLS[fx_node.target]
    flag = fx_node.kwargs.get(name, fx_node.args[position] if len(fx_node.args) > position else default)
    return flag is not False


def trace(model: nn.Module) -> fx.GraphModule:
    """Symbolically trace ``model``; raises whatever torch.fx raises for untraceable code."""
    graph = _LeafTracer().trace(model)
    for node in list(graph.nodes):  # reading a leaf's weight while deciding it is a leaf records an unused get_attr
        if node.op == "get_attr" and not node.users:
            graph.erase_node(node)
        elif isinstance(node.type, str):  # a postponed annotation ("torch.Tensor"): the module would not pickle
            node.type = None
    return fx.GraphModule(model, graph)


def discover(model: nn.Module, example_inputs: tuple[Any, ...], *, structural: bool = True) -> Discovery:
    gm = trace(model)
    ShapeProp(gm).propagate(*example_inputs)
    found = pair(graph_nodes(gm, model), "fx", structural=structural)
    found.graph = gm
    return found


def graph_nodes(gm: fx.GraphModule, root: nn.Module) -> dict[int, Node]:
    """Translate ``gm.graph`` into pairing nodes; ``root`` resolves module paths."""
    index = {n: i for i, n in enumerate(gm.graph.nodes)}
    calls = Counter(n.target for n in gm.graph.nodes if n.op == "call_module")
    nodes: dict[int, Node] = {}
    constant = constant_nodes(gm.graph)  # a batch_norm over these normalises a weight, not a batch
    for fx_node in gm.graph.nodes:
        if fx_node.op not in ("call_module", "call_function", "call_method"):
            continue
        node = Node(key=index[fx_node], label=_label(fx_node), name=fx_node.name)
        if fx_node.op == "call_module":
            module = root.get_submodule(fx_node.target)
            node.calls = calls[fx_node.target]
            if is_bn_module(module):
                node.bn = bn_ref(fx_node.target, module)
            elif (type(module) is nn.Identity or isinstance(module, _DROPOUTS) and not module.training) and fx_node.args:
                node.op, node.operands = "identity", [_operand(fx_node.args[0], index)]
            else:
                node.layer = producer_ref(fx_node.target, module)
        elif fx_node.target in _BN_CALLS and not (fx_node.args and fx_node.args[0] in constant):
            node.bn = functional_bn_ref(fx_node)
        elif fx_node.target in _LAYER_CALLS:
            node.layer, node.refusal = functional_layer_ref(fx_node)
        elif fx_node.target in _DROPOUT_CALLS and fx_node.args and not _dropout_training(fx_node):
            node.op, node.operands = "identity", [_operand(fx_node.args[0], index)]
        elif _is_call(fx_node, _ADDS | _SUBS):
            node.op, node.operands = _sum_operands(fx_node, index, "sub" if _is_call(fx_node, _SUBS) else "add")
            node.label = fx_node.name
        elif _is_call(fx_node, _MULS):
            node.op, node.operands, node.factor = _product(fx_node, index, constant)
            node.label = fx_node.name
        elif _is_call(fx_node, _CATS):
            args = _bound(fx_node, ("tensors", "dim"))
            axis = args.get("dim", args.get("axis", 0))
            if isinstance(args.get("tensors"), (list, tuple)) and isinstance(axis, int):
                node.op, node.label = "concat", fx_node.name
                node.operands = [_operand(a, index) for a in args["tensors"]]
                node.axis = axis + (_rank(fx_node) or 0) if axis < 0 else axis
        if fx_node.op == "call_function" and (node.bn or node.layer) is not None:
            node.label = (node.bn or node.layer).name
        data = fx_node.args[0] if fx_node.args else None
        if isinstance(data, fx.Node):
            node.input = index[data] if data.op not in ("placeholder", "get_attr") else None
            node.in_rank = _rank(data)
            node.source = data.name
        data_out = bn_output(fx_node) if node.bn is not None else fx_node
        node.users = [index[u] for u in data_out.users if u.op != "output" and _is_tensor(u)]
        node.is_output = any(u.op == "output" for u in data_out.users)
        node.rank = _rank(data_out)
        node.channels = _channels(data_out)
        nodes[node.key] = node
    # A getitem that unpacks a BN's tuple is part of the BN: its users already count as the BN's.
    for fx_node in gm.graph.nodes:
        if fx_node.target in _BN_CALLS and bn_output(fx_node) is not fx_node:
            item = index[bn_output(fx_node)]
            nodes.pop(item, None)
            for n in nodes.values():
                if n.input == item:
                    n.input = index[fx_node]
    return nodes


def constant_nodes(graph: fx.Graph) -> set[fx.Node]:
    """The nodes computed from attributes alone (no model input): a weight, its ``view``, its standardisation."""
    constant: set[fx.Node] = set()
    for node in graph.nodes:
        inputs = node.all_input_nodes
        if node.op == "get_attr" or (node.op in ("call_function", "call_method") and inputs
                                     and all(n in constant for n in inputs)):
            constant.add(node)
    return constant


def _is_call(fx_node: fx.Node, targets: set[Any]) -> bool:
    if fx_node.op == "call_method":
        return fx_node.target in targets
    return fx_node.op == "call_function" and fx_node.target in targets


def _operand(value: Any, index: dict[fx.Node, int]) -> tuple[str | None, int | None]:
    """(tensor id, producer key) of an Add/Concat operand: constants and parameters get no id."""
    if not isinstance(value, fx.Node) or value.op == "get_attr":
        return None, None
    return value.name, (index[value] if value.op != "placeholder" else None)


def _sum_operands(fx_node: fx.Node, index: dict[fx.Node, int], op: str
                  ) -> tuple[Any, list[tuple[str | None, int | None]]]:
    """An elementwise sum's (or difference's) operands, or (None, []) when it is not a plain one. A literal 0
    adds nothing; a difference with one operand left is not one (``0 - x``)."""
    args = _bound(fx_node, ("input", "other", "alpha"))
    if args.get("alpha", 1) != 1 or set(args) - {"input", "other", "alpha"}:
        return None, []
    operands = []
    for position, value in enumerate((args.get("input"), args.get("other"))):
        if isinstance(value, (int, float)) and value == 0 and not isinstance(value, bool) and (op == "add" or position):
            continue
        if isinstance(value, fx.Node) and not _is_tensor(value):
            return None, []
        operands.append(_operand(value, index))
    return (op if len(operands) == 2 else "add"), operands


def _product(fx_node: fx.Node, index: dict[fx.Node, int], constant: set[fx.Node]) -> tuple[Any, list, Any]:
    """A product of data with a per-channel constant (a stored tensor, or a number): (op, operands, factor)."""
    args = _bound(fx_node, ("input", "other"))
    if set(args) != {"input", "other"}:
        return None, [], None
    for data, other in ((args["input"], args["other"]), (args["other"], args["input"])):
        if not isinstance(data, fx.Node) or data in constant:
            continue
        if isinstance(other, (int, float)) and not isinstance(other, bool):
            return "mul", [_operand(data, index)], Factor(None, float(other))
        if isinstance(other, fx.Node) and other in constant:
            path = _stored(other)
            meta, rank = _tensor_meta(other), _rank(fx_node)
            shape = tuple(getattr(meta, "shape", ())) if meta is not None else None
            if path is not None and shape is not None and rank is not None and per_channel(shape, rank):
                return "mul", [_operand(data, index)], Factor(path)
    return None, [], None


def _stored(node: fx.Node) -> str | None:
    """The attribute a constant is, through reshapes that keep its values in order."""
    while node.op != "get_attr":
        if not _is_call(node, _RESHAPES) or not node.args or not isinstance(node.args[0], fx.Node):
            return None
        node = node.args[0]
    return node.target


def _channels(n: fx.Node) -> int | None:
    meta = _tensor_meta(n)
    shape = getattr(meta, "shape", None)
    if shape is None or len(shape) < 2:
        return None
    try:
        return int(shape[1])
    except (TypeError, ValueError):  # symbolic
        return None


def bn_output(fx_node: fx.Node) -> fx.Node:
    """The node carrying a BN call's normalised output (``getitem(bn, 0)`` for tuple-returning ops)."""
    if fx_node.target is not _aten._native_batch_norm_legit_no_training.default:
        return fx_node
    items = [u for u in fx_node.users if u.target is operator.getitem and u.args[1] == 0]
    return items[0] if len(items) == 1 else fx_node


def _bound(fx_node: fx.Node, names: tuple[str, ...]) -> dict[str, Any]:
    args = dict(zip(names, fx_node.args))
    args.update(fx_node.kwargs)
    return args


def _attr_path(value: Any) -> str | None:
    return value.target if isinstance(value, fx.Node) and value.op == "get_attr" else None


def functional_layer_ref(fx_node: fx.Node) -> tuple[LayerRef | None, Reason | None]:
    """A conv/linear call whose weight (and bias, if any) are attributes of the root; else (None, why not)."""
    kind, names = _LAYER_CALLS[fx_node.target]
    args = _bound(fx_node, names)
    weight = _attr_path(args.get("weight"))
    bias = args.get("bias")
    for role, value in (("weight", args.get("weight")), ("bias", bias)):
        if value is not None and _attr_path(value) is None:
            what = value.name if isinstance(value, fx.Node) else type(value).__name__
            return None, Reason("not-constant", f"{role} is computed in forward ({what}), not a stored tensor: a "
                                "fold written into the stored tensor would pass through that computation (weight "
                                "standardisation, weight norm) and not be exact")
    if kind == "convolution":
        kind = "conv_transpose" if args.get("transposed") else "conv"
    meta = _tensor_meta(args["weight"])
    shape = tuple(int(d) for d in meta.shape) if hasattr(meta, "shape") else None
    geometry = None
    if kind == "conv" and shape is not None:
        geometry = conv_geometry(shape[2:], args.get("stride", 1), args.get("padding", 0), args.get("dilation", 1))
    padding = args.get("padding", 0)
    padded = (padding not in ("valid",)) if isinstance(padding, str) else any(
        p != 0 for p in (padding if isinstance(padding, (list, tuple)) else [padding]))
    if geometry is not None:
        padded = any(p != (0, 0) for p in geometry.pads)
    return LayerRef(name=weight.rpartition(".")[0] or weight, kind=kind, weight=weight, bias=_attr_path(bias),
                    groups=int(args.get("groups", 1)), padded=kind == "conv" and padded, shape=shape,
                    geometry=geometry), None


def functional_bn_ref(fx_node: fx.Node) -> BNRef:
    """A batch-norm call (Python's ``F.batch_norm`` or an aten op) reading the root's attributes."""
    args = _bound(fx_node, _BN_CALLS[fx_node.target])
    paths = {k: _attr_path(args.get(k)) for k in ("running_mean", "running_var", "weight", "bias")}
    training = args.get("training", False)
    eps = args.get("eps", 1e-5)
    fixed = paths["running_mean"] is not None and paths["running_var"] is not None
    owner = (paths["running_mean"] or fx_node.name).rpartition(".")[0] or fx_node.name
    return BNRef(
        name=owner,
        mean=paths["running_mean"],
        var=paths["running_var"],
        weight=paths["weight"],
        bias=paths["bias"],
        eps=float(eps) if isinstance(eps, (int, float)) else 1e-5,
        plain=True,
        batch_stats=not fixed or training is not False or not isinstance(eps, (int, float)),
    )


def _label(n: fx.Node) -> str:
    if n.op == "call_module":
        return str(n.target)
    if n.op == "call_method":
        return f"Tensor.{n.target}"
    return getattr(n.target, "__name__", str(n.target))


def _tensor_meta(n: fx.Node) -> Any:
    return n.meta.get("tensor_meta", n.meta.get("val"))


def _is_tensor(n: fx.Node) -> bool:
    """Whether ``n`` yields tensor data (``x.size()`` and friends are not data uses)."""
    if "tensor_meta" in n.meta:
        return True
    if "val" in n.meta:
        val = n.meta["val"]
        return isinstance(val, torch.Tensor) or (isinstance(val, (tuple, list)) and any(
            isinstance(v, torch.Tensor) for v in val))
    return "type" not in n.meta  # nothing recorded: count it, to stay on the safe side


def _rank(n: fx.Node) -> int | None:
    meta = _tensor_meta(n)
    return len(meta.shape) if hasattr(meta, "shape") else None
