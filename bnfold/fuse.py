"""``bnfold.fuse``: fold every BatchNorm that can be folded, and prove parity with the unfolded model.

The model's kind (:mod:`bnfold.kinds`) decides how: the torch kinds fold a copy and compare it with the eval
model in PyTorch (:mod:`bnfold.fold.prove`); an ONNX graph is folded and proven in onnxruntime
(:mod:`bnfold.onnx.fuse`). The caller's model is never modified.
"""

from __future__ import annotations

from typing import Any

import torch

from bnfold.discover.graph import Discovery
from bnfold.fold.result import FuseResult
from bnfold.inputs import InputSpec
from bnfold.kinds import adapter_for
from bnfold.runtime import Reference, split_examples


def fuse(
    model: Any,
    example_inputs: tuple[torch.Tensor, ...] | list[InputSpec] | None = None,
    *,
    atol: float | None = None,
    rtol: float | None = None,
    seed: int = 0,
    method: str = "auto",
    keep_structure: bool = False,
    reference: Reference | None = None,
) -> FuseResult:
    """Fold every BatchNorm of ``model`` that can be folded and prove the result matches.

    ``model`` is an ``nn.Module``, a TorchScript module, a ``torch.export`` program, or an ``onnx.ModelProto``
    (folded by :func:`bnfold.onnx.fuse.fuse_onnx` and proven in onnxruntime). ``example_inputs``
    are tensors (compared as they are, batch 1 being their first sample; further draws for discovery are
    seeded, integers within the range of the given values) or :class:`~bnfold.inputs.InputSpec` objects.
    A ``torch.export`` program and an ONNX graph declare their inputs: ``example_inputs`` may be omitted.
    ``method`` picks discovery for ``nn.Module`` models:
    ``"fx"``, ``"observed"`` or ``"auto"`` (fx, falling back to observing forward passes when tracing
    fails). ``keep_structure`` keeps every module and state-dict key (BNs neutralised instead of removed).
    The input model is not modified; ``result.model`` is a folded copy in eval mode. ``reference`` is the eval
    model's outputs when the caller computed them already (``bnfold verify``, ``bnfold export``).
    """
    given, specs = split_examples(example_inputs)
    adapter = adapter_for(model, method=method, keep_structure=keep_structure)
    return adapter.fuse(given, specs, atol=atol, rtol=rtol, seed=seed, reference=reference)


def plan(model: Any, example_inputs: tuple[torch.Tensor, ...] | list[InputSpec] | None = None, *, seed: int = 0,
         method: str = "auto") -> Discovery:
    """Which BatchNorm folds into what, and why the others do not, without changing anything.

    The same rules as :func:`fuse` (and ``bnfold fuse model.onnx``): ``fuse`` applies exactly this plan, so
    "foldable" means one thing. ``model`` is any kind bnfold reads (nn.Module, ScriptModule, ExportedProgram,
    onnx.ModelProto); an ONNX graph needs no example inputs.
    """
    given, specs = split_examples(example_inputs)
    return adapter_for(model, method=method).plan(given, specs, seed)
