"""Graph edits on a ``torch.fx.GraphModule``, for the hosts that rewrite one (:mod:`bnfold.kinds.module` given a
traced eager model, :mod:`bnfold.kinds.program` for ``torch.export`` programs): a zero bias for a functional
conv/linear call, the graph side of a branch merge, and what only the removed nodes read.
"""

from __future__ import annotations

import operator

import torch
from torch import fx, nn

from bnfold.discover.fx import constant_nodes
from bnfold.discover.graph import Merge
from bnfold.fold.apply import CannotFold
from bnfold.layers import LayerRef, get_tensor


def write(root: nn.Module, path: str, value: torch.Tensor) -> None:
    """Overwrite the tensor at ``path`` in place, keeping its dtype and device."""
    target = get_tensor(root, path)
    with torch.no_grad():
        target.copy_(value.to(device=target.device, dtype=target.dtype))


def reader(gm: fx.GraphModule, attr_arg: int, path: str) -> fx.Node:
    """The call reading attribute ``path`` among its arguments ``attr_arg`` to ``attr_arg + 3``."""
    for node in gm.graph.nodes:
        if node.op == "call_function" and any(getattr(a, "target", None) == path for a in node.args[attr_arg:attr_arg + 4]):
            return node
    raise CannotFold(f"no graph node reads {path}")


def graph_add_bias(gm: fx.GraphModule, layer: LayerRef) -> str:
    """A zero bias attribute for the functional conv/linear call reading ``layer.weight``; returns its path."""
    node = reader(gm, 1, layer.weight)
    weight = get_tensor(gm, layer.weight)
    out = weight.shape[1] * layer.groups if layer.kind == "conv_transpose" else weight.shape[0]
    name = f"_bnfold_bias_{len([n for n, _ in gm.named_parameters() if n.startswith('_bnfold_bias_')])}"
    gm.register_parameter(name, nn.Parameter(torch.zeros(out, dtype=weight.dtype, device=weight.device),
                                             requires_grad=False))
    with gm.graph.inserting_before(node):
        attr = gm.graph.get_attr(name)
    if "bias" in node.kwargs:
        node.kwargs = {**node.kwargs, "bias": attr}
    else:
        args = list(node.args) + [None] * max(0, 3 - len(node.args))
        args[2] = attr
        node.args = tuple(args)
    gm.recompile()
    return name


def merge_in_graph(gm: fx.GraphModule, merge: Merge) -> None:
    """The graph side of a merge: the target conv's output replaces the Add's, and the Add tree, the other
    convs and the BNs are erased with the attributes only they read. Checks everything before changing anything."""
    by_name = {n.name: n for n in gm.graph.nodes}
    missing = [name for name in (merge.root, merge.target_node, *merge.removed) if name not in by_name]
    if missing:
        raise CannotFold(f"the graph has no node {missing[0]} any more")
    root, target = by_name[merge.root], by_name[merge.target_node]
    doomed = {root, *(by_name[name] for name in merge.removed)}
    doomed |= {u for n in list(doomed) for u in n.users if u.target is operator.getitem}  # tuple outputs of BN ops
    for node in doomed - {root}:
        outside = [u.name for u in node.users if u not in doomed and u is not root]
        if outside:
            raise CannotFold(f"{node.name} is also read by {outside[0]}")
    constants = constant_inputs(doomed)
    owners = tuple(f"{path.rpartition('.')[0]}." for b in merge.branches
                   for path in ((b.bn.mean if b.bn else None), (b.layer.weight if b.layer and b.layer != merge.target
                                                                 else None)) if path and "." in path)
    root.replace_all_uses_with(target)
    for node in reversed(list(gm.graph.nodes)):
        # with what only they read (a layer scale), and the tensors of the modules that go (num_batches_tracked)
        stale = not node.users and (node in constants or (node.op == "get_attr" and str(node.target).startswith(owners)))
        if node in doomed or stale:
            gm.graph.erase_node(node)
    gm.delete_all_unused_submodules()
    gm.recompile()


def constant_inputs(nodes: set[fx.Node]) -> set[fx.Node]:
    """The attributes ``nodes`` read, and what is computed from attributes alone on the way (a ``view``)."""
    constant = constant_nodes(next(iter(nodes)).graph) if nodes else set()
    found: set[fx.Node] = set()
    stack = [a for n in nodes for a in n.all_input_nodes]
    while stack:
        node = stack.pop()
        if node in constant and node not in found and node not in nodes:
            found.add(node)
            stack.extend(node.all_input_nodes)
    return found
