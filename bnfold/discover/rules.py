"""The pairing rules, each stated once on the pairing graph of :mod:`bnfold.discover.nodes`, so the same rules
serve torch.fx graphs, observed forward passes, ``torch.export`` and TorchScript graphs and ONNX graphs.

A rule is an object (:class:`Rule`): a *pattern* (the neighbour a BN would fold into, or through), a *check* (why
it cannot: a :class:`~bnfold.discover.reasons.Reason`, with its code), an *action* (the fold).
:func:`bnfold.discover.graph.pair` runs them in the order of :data:`RULES`; the same objects serve every command
that counts folds (lint, inspect) and every one that applies them (fuse, export), so "foldable" means one thing.

* :func:`bn_reason`: what rules out a BN whatever its neighbours (batch statistics, a BN that runs twice).
* :data:`AFTER`: ``conv/linear -> BN``, the layer's output read by the BN alone.
* :data:`BEFORE`: ``BN -> linear / unpadded conv``, the BN's output read by the layer alone.
* :data:`THROUGH`, Concat: a BN after a channel Concat of conv/linear outputs (each used only by the Concat) is a
  per-slice fold: each producer absorbs its channels of the BN.
* :data:`THROUGH`, Add: a BN after an Add (or a chain of Adds) of conv/linear outputs (each used only by the Add)
  scales every operand; one operand also absorbs the shift: ``BN(a + b) = s*a + s*b + t``. Only Adds: a Sub or a
  product on the way would put the shift on the wrong side.
* :func:`find_merges` / :func:`apply_merges`: **branch merging** (re-parameterisation), a rule on the whole graph.
  A sum (Adds, Subs, Identities, products with a per-channel constant) whose operands all read one input through
  ``conv -> BN``, ``conv``, ``BN`` (an identity kernel) or nothing (the input itself) is one conv: every kernel is
  scaled by its BN and its coefficient in the sum, padded to the largest kernel and summed, the biases likewise.
  RepVGG, MobileOne, DBB and FastViT's RepMixer train this way; timm's ``reparameterize_model`` does it with the
  model's own code.

:data:`THROUGH` and branch merging are *structural* (each front-end marks Adds and Concats with :attr:`Node.op`; a
host that must keep the model's structure turns them off). Each rule checks its conditions on the graph alone and,
when one fails, says which and where.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator

from bnfold.discover.nodes import Branch, Factor, Fold, Merge, Node, Part
from bnfold.discover.reasons import Reason
from bnfold.layers import LayerRef


@dataclasses.dataclass(frozen=True)
class Rule:
    """One way a BN folds into the layers next to it.

    ``pattern(bn_node, nodes)``: the neighbour it would fold into or through (None: the rule does not apply);
    ``check(bn_node, neighbour, nodes)``: why it cannot (None: it can); ``action(bn_node, neighbour, nodes)``: the
    fold, once the check passed. ``structural``: the rule needs the Adds and Concats of the graph.
    """

    name: str
    pattern: Callable[[Node, dict[int, Node]], Node | None]
    check: Callable[[Node, Node, dict[int, Node]], Reason | None]
    action: Callable[[Node, Node, dict[int, Node]], Fold]
    structural: bool = False

    def apply(self, bn_node: Node, nodes: dict[int, Node]) -> Fold | Reason | None:
        """The fold, or why there is none; None when the pattern does not match."""
        neighbour = self.pattern(bn_node, nodes)
        if neighbour is None:
            return None
        return self.check(bn_node, neighbour, nodes) or self.action(bn_node, neighbour, nodes)


def bn_reason(bn_node: Node) -> Reason | None:
    """Why the BN cannot fold whatever its neighbours; None when the rules decide."""
    bn = bn_node.bn
    assert bn is not None
    if bn_node.refusal is not None:
        return bn_node.refusal
    if bn.batch_stats:
        return Reason("batch-statistics", "normalises with batch statistics even in eval (track_running_stats=False "
                                          "or no running statistics): there are no fixed statistics to fold")
    if bn_node.calls > 1:
        return Reason("bn-reused", f"runs {bn_node.calls} times per forward: one set of statistics cannot be folded "
                                   "into several producers")
    return None


def not_adjacent(bn_node: Node, nodes: dict[int, Node]) -> Reason:
    """The reason of a BN that no rule's pattern matches."""
    src = nodes.get(bn_node.input) if bn_node.input is not None else None
    src_label = src.label if src is not None else "a model input"
    users = ", ".join(nodes[u].label for u in bn_node.users) or "nothing"
    return Reason("not-adjacent", f"not next to a conv/linear: input from {src_label}, output to {users} (folding "
                                  "needs conv/linear -> BN, or BN -> linear / unpadded conv)")


def _source(bn_node: Node, nodes: dict[int, Node]) -> Node | None:
    """The node feeding the BN, through the pass-through nodes on the way (:func:`_passing`)."""
    chain = _passing(bn_node, nodes)
    last = chain[-1]
    return nodes.get(last.input) if last.input is not None else None


def _passing(bn_node: Node, nodes: dict[int, Node]) -> list[Node]:
    """The BN, then each pass-through node between it and the node that feeds it, innermost last: each read by
    the next alone, none a model output. A pass-through is an Identity (an inference Dropout in ONNX,
    ``nn.Identity`` / an eval ``nn.Dropout`` in torch), a Reshape or Flatten that keeps axes 0 and 1, or a
    Transpose followed by its inverse (tf2onnx's NHWC pairs). A fold through them is exact: every element of a
    channel stays in that channel. The BN's output name goes to the last of them."""
    chain = [bn_node]
    while chain[-1].input is not None:
        src = _plain(nodes.get(chain[-1].input), chain[-1])
        if src is None or src.op not in ("identity", "reshape", "transpose"):
            break
        if src.op == "transpose":  # only as the second of an inverse pair
            first = _plain(nodes.get(src.input), src) if src.input is not None else None
            if first is None or first.op != "transpose" or not inverse(first.perm, src.perm):
                break
            chain.append(src)
            src = first
        chain.append(src)
    return chain


def _plain(node: Node | None, reader: Node) -> Node | None:
    """``node`` when it is no layer or BN, ``reader`` alone reads it, it is no model output and has a data input."""
    if (node is None or node.layer is not None or node.bn is not None or node.is_output
            or node.users != [reader.key] or node.input is None):
        return None
    return node


def inverse(first: tuple[int, ...] | None, second: tuple[int, ...] | None) -> bool:
    """Whether transposing by ``first`` then by ``second`` gives the input back."""
    return (first is not None and second is not None and len(first) == len(second)
            and all(first[axis] == i for i, axis in enumerate(second)))


def _linear_rank(layer: LayerRef, rank: int | None) -> Reason | None:
    """A BN after a Linear whose output is not of rank 2 normalises another axis than its features."""
    if layer.kind == "linear" and rank not in (None, 2):
        return Reason("linear-rank", f"{layer.name} output has rank {rank}: the BN normalises axis 1, not the "
                                     "Linear's feature axis")
    return None


# -- conv/linear -> BN --------------------------------------------------------------------------------------
def _producer(bn_node: Node, nodes: dict[int, Node]) -> Node | None:
    """The layer feeding the BN, or a node feeding it that refuses every fold."""
    src = _source(bn_node, nodes)
    return src if src is not None and (src.layer is not None or src.refusal is not None) else None


def _check_after(bn_node: Node, src: Node, nodes: dict[int, Node]) -> Reason | None:
    layer = src.layer
    if layer is None:
        assert src.refusal is not None
        return Reason(src.refusal.code, f"follows {src.label}, whose {src.refusal.text}")
    if src.calls > 1:
        return Reason("layer-reused", f"producer {layer.name} runs {src.calls} times per forward (shared weights): "
                                      "folding would change every call")
    reader = _passing(bn_node, nodes)[-1]
    others = [nodes[u].label for u in src.users if u != reader.key]
    if others or src.is_output:
        where = ", ".join(others + (["the model output"] if src.is_output else []))
        return Reason("shared-output", f"output of {layer.name} also feeds {where}: folding would change what "
                                       "those see")
    return _linear_rank(layer, bn_node.in_rank)


def _fold_after(bn_node: Node, src: Node, nodes: dict[int, Node]) -> Fold:
    return Fold(bn_node.bn, src.layer, "after")


AFTER = Rule("after", _producer, _check_after, _fold_after)


# -- BN -> linear / unpadded conv ---------------------------------------------------------------------------
def _consumer(bn_node: Node, nodes: dict[int, Node]) -> Node | None:
    """The one node reading the BN's output as its data input: a layer (not a transposed conv), or a node that
    refuses every fold."""
    if len(bn_node.users) != 1 or bn_node.is_output:
        return None
    dst = nodes[bn_node.users[0]]
    if dst.input != bn_node.key:
        return None
    if dst.layer is None:
        return dst if dst.refusal is not None else None
    return dst if dst.layer.kind != "conv_transpose" else None


def _check_before(bn_node: Node, dst: Node, nodes: dict[int, Node]) -> Reason | None:
    layer = dst.layer
    if layer is None:
        assert dst.refusal is not None
        return Reason(dst.refusal.code, f"feeds {dst.label}, whose {dst.refusal.text}")
    if not bn_node.bn.plain:
        return Reason("activation", f"applies an activation after normalising, before {layer.name}: cannot fold "
                                    "forward")
    if dst.calls > 1:
        return Reason("layer-reused", f"consumer {layer.name} runs {dst.calls} times per forward (shared weights)")
    if layer.padded:
        return Reason("padding", f"feeds padded conv {layer.name}: its padded zeros are not normalised, so folding "
                                 "would not be exact")
    if layer.kind == "linear" and dst.in_rank not in (None, 2):
        return Reason("linear-rank", f"feeds {layer.name} with a rank-{dst.in_rank} input: the BN channels are not "
                                     "the Linear's input features")
    return None


def _fold_before(bn_node: Node, dst: Node, nodes: dict[int, Node]) -> Fold:
    return Fold(bn_node.bn, dst.layer, "before")


BEFORE = Rule("before", _consumer, _check_before, _fold_before)


# -- shared helpers of the structural rules -----------------------------------------------------------------
def out_channels(layer: LayerRef) -> int | None:
    """The layer's output channels, from its weight shape in torch's layout."""
    if layer.shape is None:
        return None
    return layer.shape[1] * layer.groups if layer.kind == "conv_transpose" else layer.shape[0]


def per_channel(shape: tuple[int, ...], rank: int, axis: int = 1) -> bool:
    """Whether a constant of ``shape``, broadcast against a rank-``rank`` tensor, varies along ``axis`` (the channel
    axis) at most (so multiplying by it scales channels, a layer scale; adding it shifts them, a bias)."""
    if len(shape) > rank:
        return False
    full = (1,) * (rank - len(shape)) + tuple(int(d) for d in shape)
    return all(d == 1 for other, d in enumerate(full) if other != axis)


def _only_reader(node: Node, readers: set[int]) -> bool:
    """``node``'s output is read once, by one of ``readers``, and is not a model output."""
    return len(node.users) == 1 and node.users[0] in readers and not node.is_output


def _add_tree(root: Node, nodes: dict[int, Node]) -> tuple[list[tuple[str | None, int | None]], list[int]]:
    """The operands of a sum of Adds (an Add whose output only another Add reads belongs to it): (leaves, inner)."""
    leaves, inner = _tree(root, nodes, ("add",))
    return [(leaf.ident, leaf.key) for leaf in leaves], inner


@dataclasses.dataclass
class _Leaf:
    ident: str | None
    key: int | None
    sign: int = 1
    factors: tuple[Factor, ...] = ()


_LINEAR = ("add", "sub", "mul", "identity")


def _tree(root: Node, nodes: dict[int, Node], ops: tuple[str, ...] = _LINEAR) -> tuple[list[_Leaf], list[int]]:
    """The operands of a linear expression rooted at ``root``, through the ``ops`` nodes whose output only the
    expression reads: each leaf with its sign and the constant factors on its way (leaves, inner node keys)."""
    leaves: list[_Leaf] = []
    inner: list[int] = []

    def operands(node: Node, sign: int, factors: tuple[Factor, ...]) -> Iterator[tuple[Node, str | None,
                                                                                       int | None, int, tuple]]:
        if node.op == "mul" and node.factor is not None:
            factors = (*factors, node.factor)
        for position, (ident, key) in enumerate(node.operands):
            yield node, ident, key, -sign if node.op == "sub" and position == 1 else sign, factors

    # Depth first, operands in order, without recursion: an exporter may write a chain of thousands of Adds.
    stack = [operands(root, 1, ())]
    while stack:
        item = next(stack[-1], None)
        if item is None:
            stack.pop()
            continue
        node, ident, key, sign, factors = item
        child = nodes.get(key) if key is not None else None
        if child is not None and child.op in ops and _only_reader(child, {node.key}):
            inner.append(child.key)
            stack.append(operands(child, sign, factors))
        else:
            leaves.append(_Leaf(ident, key, sign, factors))
    return leaves, inner


# -- branch merging -----------------------------------------------------------------------------------------
@dataclasses.dataclass
class _Raw:
    conv: Node | None
    bn: Node | None
    source: str | None  # the tensor the branch reads
    leaf: _Leaf
    why: str | None = None  # why a conv next to it does not count as part of the branch


def _classify(leaf: _Leaf, tree: set[int], nodes: dict[int, Node]) -> _Raw:
    node = nodes.get(leaf.key) if leaf.key is not None else None
    if node is None:
        return _Raw(None, None, leaf.ident, leaf)
    own = _only_reader(node, tree) and node.calls == 1
    if node.bn is not None and own and node.bn.plain and not node.bn.batch_stats and node.refusal is None:
        conv = nodes.get(node.input) if node.input is not None else None
        if conv is not None and conv.layer is not None and _only_reader(conv, {node.key}) and conv.calls == 1:
            return _Raw(conv, node, conv.source, leaf)
        why = None
        if conv is not None and conv.layer is not None:
            others = [nodes[u].label for u in conv.users if u != node.key] + (["the output"] if conv.is_output else [])
            why = (f"the output of {conv.layer.name} also feeds {', '.join(others)}" if others else
                   f"{conv.layer.name} runs {conv.calls} times per forward")
        return _Raw(None, node, node.source, leaf, why)
    if node.layer is not None and own:
        return _Raw(node, None, node.source, leaf)
    return _Raw(None, None, leaf.ident, leaf)


def _label(raw: _Raw) -> str:
    if raw.conv is not None or raw.bn is not None:
        return (raw.conv or raw.bn).label
    return "a constant" if raw.leaf.ident is None else f"'{raw.leaf.ident}'"


def find_merges(nodes: dict[int, Node]) -> tuple[list[Merge], dict[str, Reason]]:
    """Every re-parameterisable sum (merges), and for blocks that look like one but cannot merge, a reason for
    each BN on a branch without a conv (the others still fold into their conv).

    A sum is an expression of Adds, Subs, Identities and products with per-channel constants (FastViT's
    ``x + layer_scale * (mixer(x) - norm(x))``). The outermost is tried first; when it cannot merge, the sums
    inside it are tried on their own. A sum of convs without any BN merges too (an exporter may have folded
    each branch's BN already): it removes convs, not BNs.
    """
    merges: list[Merge] = []
    reasons: dict[str, Reason] = {}
    consumed: set[int] = set()
    for root in sorted(nodes.values(), key=lambda n: n.key, reverse=True):
        if root.op not in ("add", "sub") or not root.name or root.key in consumed:
            continue
        leaves, inner = _tree(root, nodes)
        tree = {root.key, *inner}
        raws = [_classify(leaf, tree, nodes) for leaf in leaves]
        sources = [r.source for r in raws]
        convs = sum(1 for r in raws if r.conv)
        if (len(raws) < 2 or not convs or not (convs > 1 or any(r.bn for r in raws))
                or max(sources.count(s) for s in sources) < 2):
            continue  # not a re-parameterisable block
        merged = _merge(root, inner, raws, nodes)
        if isinstance(merged, Merge):
            merges.append(merged)
            consumed |= tree | {n.key for r in raws for n in (r.conv, r.bn) if n is not None}
        else:
            for raw in raws:
                if raw.bn is not None and raw.conv is None:
                    reasons.setdefault(raw.bn.bn.name, Reason(
                        "unmergeable-branch", f"on a branch of {root.label} that cannot merge into one conv: {merged}"))
    merged_bns = {b.bn.name for m in merges for b in m.branches if b.bn}
    return merges, {bn: why for bn, why in reasons.items() if bn not in merged_bns}


def _merge(root: Node, inner: list[int], raws: list[_Raw], nodes: dict[int, Node]) -> Merge | str:
    """The merge of ``raws`` into one conv, or why they cannot merge."""
    if len({r.source for r in raws}) > 1 or raws[0].source is None:
        why = next((r.why for r in raws if r.why), None)
        if why:
            return why
        return f"its operands ({', '.join(sorted({_label(r) for r in raws}))}) do not all read the same input"
    convs = [r.conv for r in raws if r.conv is not None]
    layers = [c.layer for c in convs]
    for layer in layers:
        if layer.kind != "conv":
            return f"{layer.name} is a {layer.kind}, not a conv"
        if layer.geometry is None or layer.shape is None:
            return f"bnfold cannot tell the padding of {layer.name} (auto_pad or an unknown weight shape)"
        if layer.geometry.pad_mode != "zeros":
            return f"{layer.name} pads with {layer.geometry.pad_mode}, not zeros"
    keys = [n.key for r in raws for n in (r.conv, r.bn) if n is not None]
    if len(set(keys)) != len(keys):
        return "one branch appears twice among the operands"
    first = layers[0]
    for layer in layers[1:]:
        for what, a, b in (("stride", first.geometry.stride, layer.geometry.stride),
                           ("dilation", first.geometry.dilation, layer.geometry.dilation),
                           ("groups", first.groups, layer.groups),
                           ("output channels", first.shape[0], layer.shape[0]),
                           ("input channels", first.shape[1], layer.shape[1]),
                           ("kernel rank", len(first.shape), len(layer.shape))):
            if a != b:
                return f"{first.name} and {layer.name} differ in {what} ({_fmt(a)} vs {_fmt(b)})"
    target_index = max(range(len(convs)), key=lambda i: (math.prod(layers[i].shape[2:]), -i))
    target, target_node = layers[target_index], convs[target_index]
    geometry = target.geometry
    identities = [r for r in raws if r.conv is None]
    if identities:
        if any(s != 1 for s in geometry.stride):
            return f"an identity branch cannot merge into convs with stride {_fmt(geometry.stride)}"
        if target.shape[1] * target.groups != target.shape[0]:
            return (f"an identity branch needs as many input as output channels ({target.name}: "
                    f"{target.shape[1] * target.groups} -> {target.shape[0]})")
        for raw in identities:
            if raw.bn is not None and raw.bn.channels not in (None, target.shape[0]):
                return f"{raw.bn.bn.name} has {raw.bn.channels} channels, {target.name} {target.shape[0]}"
    branches: list[Branch] = []
    for raw in raws:
        layer = raw.conv.layer if raw.conv else None
        kernel = layer.shape[2:] if layer else (1,) * (len(target.shape) - 2)
        pads = layer.geometry.pads if layer else ((0, 0),) * len(kernel)
        offsets = _offsets(kernel, pads, target.shape[2:], geometry.pads, geometry.dilation)
        if offsets is None:
            what = layer.name if layer else "the identity"
            return (f"the kernel of {what} does not sit inside {target.name}'s at the same place (paddings "
                    f"{_fmt(pads)} vs {_fmt(geometry.pads)})")
        names = tuple(n.name for n in (raw.conv, raw.bn) if n is not None)
        branches.append(Branch(layer, raw.bn.bn if raw.bn else None, offsets, names, raw.leaf.sign,
                               raw.leaf.factors))
    removed = [nodes[k].name for k in inner]
    removed += [n.name for r in raws for n in (r.conv, r.bn) if n is not None and n is not target_node]
    return Merge(root=root.name, label=root.label, target=target, target_node=target_node.name,
                 branches=tuple(branches), removed=tuple(removed))


def _offsets(kernel, pads, big_kernel, big_pads, dilation) -> tuple[int, ...] | None:
    """Where a kernel with ``pads`` starts inside ``big_kernel`` with ``big_pads`` so both read the same input
    positions (same stride and dilation); None when it does not fit."""
    offsets = []
    for k, (before, after), big, (big_before, big_after), d in zip(kernel, pads, big_kernel, big_pads, dilation):
        lead, trail = big_before - before, big_after - after
        if lead < 0 or trail < 0 or lead % d or trail % d or lead // d + k + trail // d != big:
            return None
        offsets.append(lead // d)
    return tuple(offsets)


def _fmt(value) -> str:
    return str(value).replace(" ", "")


def apply_merges(nodes: dict[int, Node], merges: list[Merge]) -> dict[int, Node]:
    """The graph as it is once ``merges`` are done: each root Add becomes its target conv (a copy; ``nodes`` is
    not changed), so the other rules see the merged conv (a BN after the Add folds into it)."""
    if not merges:
        return nodes
    work = {k: dataclasses.replace(n, users=list(n.users), operands=list(n.operands)) for k, n in nodes.items()}
    by_name = {n.name: k for k, n in work.items() if n.name}
    for merge in merges:
        root, target = work[by_name[merge.root]], work[by_name[merge.target_node]]
        gone = {by_name[name] for name in (*merge.removed, merge.target_node)}
        root.layer, root.op, root.operands, root.refusal = merge.target, None, [], None
        root.name, root.factor = target.name, None  # in the host's graph, the target conv now stands here
        root.input, root.source, root.in_rank, root.calls = target.input, target.source, target.in_rank, 1
        for key in gone:
            del work[key]
        for node in work.values():
            node.users = [u for u in node.users if u not in gone]
            if node.key == root.input and root.key not in node.users:
                node.users.append(root.key)
    return work


# -- folding through a Concat or an Add ---------------------------------------------------------------------
def _sum(bn_node: Node, nodes: dict[int, Node]) -> Node | None:
    """The Concat or Add feeding the BN."""
    src = _source(bn_node, nodes)
    return src if src is not None and src.op in ("add", "concat") else None


def _sum_operands(src: Node, nodes: dict[int, Node]) -> tuple[list[tuple[str | None, int | None]], set[int]]:
    """The operands the BN's share goes to, and the nodes that may read them (the Concat, or the tree of Adds)."""
    if src.op == "concat":
        return src.operands, {src.key}
    operands, inner = _add_tree(src, nodes)
    return operands, {src.key, *inner}


def _operand_channels(producer: Node) -> int | None:
    return out_channels(producer.layer) or producer.channels


def _check_through(bn_node: Node, src: Node, nodes: dict[int, Node]) -> Reason | None:
    what = "Concat" if src.op == "concat" else "Add"
    if not _only_reader(src, {bn_node.key}):
        others = [nodes[u].label for u in src.users if u != bn_node.key]
        others += ["the model output"] if src.is_output else []
        return Reason("shared-output", f"follows {what} {src.label}, whose output also feeds {', '.join(others)}: "
                                       "folding would change what those see")
    if src.op == "concat" and src.axis != 1:
        return Reason("concat-axis", f"follows {what} {src.label} on axis {src.axis}, not the channel axis")
    operands, readers = _sum_operands(src, nodes)
    keys = [key for _, key in operands]
    total = 0
    for ident, key in operands:
        producer = nodes.get(key) if key is not None else None
        if producer is None or producer.layer is None:
            label = producer.label if producer is not None else (ident or "a constant")
            refusal = producer.refusal if producer is not None else None
            code, detail = ((refusal.code, f", whose {refusal.text}") if refusal is not None else
                            ("not-a-layer", " (a conv/linear output used only there)"))
            return Reason(code, f"follows {what} {src.label}: its operand {label} is not a layer that can take its "
                                f"share of the BN{detail}")
        layer = producer.layer
        if not _only_reader(producer, readers) or keys.count(key) > 1 or producer.calls > 1:
            return Reason("shared-output", f"follows {what} {src.label}: the output of its operand {layer.name} is "
                                           "also used elsewhere (or it runs more than once), so it cannot be rescaled")
        wrong_rank = _linear_rank(layer, bn_node.in_rank)
        if wrong_rank is not None:
            return wrong_rank
        if producer.rank is not None and bn_node.in_rank is not None and producer.rank != bn_node.in_rank:
            return Reason("broadcast", f"follows {what} {src.label}: operand {layer.name} has rank {producer.rank}, "
                                       f"the sum rank {bn_node.in_rank} (broadcast across axes)")
        channels = _operand_channels(producer)
        if channels is None:
            return Reason("unknown-shape", f"follows {what} {src.label}: the channel count of {layer.name} is "
                                           "unknown")
        if src.op == "add" and bn_node.channels is not None and channels != bn_node.channels:
            return Reason("broadcast", f"follows {what} {src.label}: operand {layer.name} has {channels} channels, "
                                       f"the BN {bn_node.channels} (broadcast across channels)")
        total += channels
    if src.op == "concat" and bn_node.channels is not None and total != bn_node.channels:
        return Reason("channel-mismatch", f"follows {what} {src.label}: its operands have {total} channels, the BN "
                                          f"{bn_node.channels}")
    return None


def _fold_through(bn_node: Node, src: Node, nodes: dict[int, Node]) -> Fold:
    """Each operand's share: its slice of the BN's channels (Concat), or the scale, one of them the shift too (Add)."""
    operands, _ = _sum_operands(src, nodes)
    producers = [nodes[key] for _, key in operands]
    parts: list[Part] = []
    if src.op == "concat":
        start = 0
        for producer in producers:
            channels = _operand_channels(producer)
            parts.append(Part(producer.layer, (start, start + channels)))
            start += channels
    else:  # one operand takes the shift: one that has a bias, else one that can get one
        parts = [Part(producer.layer, None, shift=False) for producer in producers]
        pick = next((i for i, p in enumerate(parts) if p.layer.bias), None)
        pick = pick if pick is not None else next((i for i, p in enumerate(parts) if p.layer.module), 0)
        parts[pick] = dataclasses.replace(parts[pick], shift=True)
    return Fold(bn_node.bn, parts[0].layer, src.op, parts=tuple(parts))


THROUGH = Rule("through", _sum, _check_through, _fold_through, structural=True)

#: The rules :func:`bnfold.discover.graph.pair` tries on each BN, in order: the first fold wins, and the first
#: reason is the one reported (the one about the producer: the fold the user most likely expected).
RULES: tuple[Rule, ...] = (AFTER, THROUGH, BEFORE)
