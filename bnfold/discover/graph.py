"""Pairing BatchNorms with the layer that absorbs them, on a small dataflow graph that every front-end builds.

The front-ends (torch.fx, an observed forward pass, a ``torch.export`` graph, a TorchScript graph, an ONNX graph)
only translate their graphs into :class:`Node` objects; :func:`pair` runs the rules of :mod:`bnfold.discover.rules`
on them, and every BN that does not fold comes back as a :class:`Skip` with a reason a user can act on and its code
(:mod:`bnfold.discover.reasons`).

The types live in :mod:`bnfold.discover.nodes` and are importable from here, where the rest of bnfold imports them.
"""

from __future__ import annotations

from bnfold.discover.nodes import MODEL_INPUT, MODEL_OUTPUT, AffineFold, Discovery, Factor, Fold, Merge, Node, Skip
from bnfold.discover.reasons import Reason
from bnfold.discover.rules import RULES, Rule, apply_merges, bn_reason, find_merges, not_adjacent

__all__ = ["AffineFold", "Discovery", "Factor", "Fold", "Merge", "Node", "Skip", "pair", "unrecognised"]


def unrecognised(discovery: Discovery, stat_paths: list[str]) -> Discovery:
    """Add a skip for every BN-like owner of ``running_mean`` that no BN call in the graph reads.

    In a compiled graph a FrozenBatchNorm-style module is plain arithmetic, not a batch-norm call.
    """
    known = ({f.bn.mean for f in discovery.folds} | {f.bn.name for f in discovery.folds}
             | {s.bn for s in discovery.skips})
    for path in stat_paths:
        owner = path.rpartition(".")[0]
        if path not in known and owner not in known:
            discovery.skips.append(Skip(owner, "computes its normalisation with plain arithmetic in this graph, not a "
                                               "batch-norm op: load the eager model (state dict + --arch) to fold it",
                                        "plain-arithmetic"))
    return discovery


def pair(nodes: dict[int, Node], method: str, *, structural: bool = True) -> Discovery:
    """Decide, for every BN node, whether it folds and into what.

    ``structural``: also apply the structural rules of :mod:`bnfold.discover.rules` (branch merging changes the
    graph, so a host that must keep the model's structure turns it off).
    """
    found = Discovery(folds=[], skips=[], method=method)
    for node in nodes.values():
        if node.bn is not None and node.bn.name not in found.neighbours:
            found.bns.append(node.bn)
            found.neighbours[node.bn.name] = _neighbours(node, nodes)
    merges, merge_reasons = find_merges(nodes)
    if not structural:
        for merge in merges:
            for branch in merge.branches:
                if branch.bn is not None:
                    merge_reasons[branch.bn.name] = Reason("structure-kept", (
                        f"on a branch of {merge.label}: merging its branches into one conv would remove it, but "
                        "that changes the architecture, which this model keeps (--keep-structure / a state dict "
                        "for the same class)"))
        merges = []
    found.merges = merges
    found.folds.extend(Fold(b.bn, m.target, "merge", merge=m) for m in merges for b in m.branches if b.bn)
    work = apply_merges(nodes, merges)
    rules = tuple(rule for rule in RULES if structural or not rule.structural)
    done = {f.bn.name for f in found.folds}
    for node in work.values():
        if node.bn is None or node.bn.name in done:
            continue
        done.add(node.bn.name)
        result = _pair_one(node, work, rules)
        # A BN on a branch of a block that does not merge is "not adjacent" to a conv: the block says more.
        if isinstance(result, Skip) and result.code == "not-adjacent" and result.bn in merge_reasons:
            result = Skip.because(result.bn, merge_reasons[result.bn])
        (found.folds if isinstance(result, Fold) else found.skips).append(result)
    return found


def _neighbours(node: Node, nodes: dict[int, Node]) -> tuple[str, list[str]]:
    """The labels of what feeds ``node`` and of what reads its output."""
    src = nodes.get(node.input) if node.input is not None else None
    users = [nodes[u].label for u in node.users if u in nodes] + ([MODEL_OUTPUT] if node.is_output else [])
    return (src.label if src is not None else MODEL_INPUT), users


def _pair_one(node: Node, nodes: dict[int, Node], rules: tuple[Rule, ...]) -> Fold | Skip:
    """The first fold a rule makes; else the first rule's reason; else why no rule applies."""
    bn = node.bn
    assert bn is not None
    why = bn_reason(node)
    if why is not None:
        return Skip.because(bn.name, why)
    first: Reason | None = None
    for rule in rules:
        result = rule.apply(node, nodes)
        if isinstance(result, Fold):
            return result
        first = first or result
    return Skip.because(bn.name, first or not_adjacent(node, nodes))
