"""What every model kind answers; :mod:`bnfold.kinds` lists the kinds and picks one for a model."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import torch
from torch import nn

from bnfold.discover.graph import Discovery
from bnfold.errors import InputSpecError
from bnfold.fold import prove
from bnfold.fold.apply import TensorHost
from bnfold.fold.result import FuseResult
from bnfold.inputs import SHAPE_HINT, InputSpec
from bnfold.runtime import Reference, eval_mode


def stat_paths(model: nn.Module) -> list[str]:
    """The running-mean buffers of ``model``: every BN-like module a graph kind may not show as a BN op."""
    return [name for name, _ in model.named_buffers() if name.endswith("running_mean")]


class Adapter:
    """What bnfold needs to know about one kind of model. Subclasses set the class attributes."""

    kind: ClassVar[str]
    has_modes: ClassVar[bool] = True  # train()/eval() apply; otherwise the mode is part of the graph
    eager: ClassVar[bool] = False  # a live nn.Module tree: module attributes (momentum), recalibration
    runs_in_onnxruntime: ClassVar[bool] = False  # proven in onnxruntime, written as ONNX (--timeout, --external-data)
    host: ClassVar[type[TensorHost]]  # writes folds into this kind's tensors
    #: Commands this kind cannot take: command -> (what is wrong, what to do instead), with ``{name}`` (how the
    #: caller calls the model) and ``{file}`` (its file) filled in by :meth:`require`.
    refuses: ClassVar[dict[str, tuple[str, str]]] = {}

    def __init__(self, model: Any) -> None:
        self.model = model

    def require(self, command: str, name: str = "the model", file: str = "model.onnx") -> None:
        """Raise :class:`InputSpecError` when ``command`` does not apply to this kind."""
        if command in self.refuses:
            message, hint = self.refuses[command]
            raise InputSpecError(message.format(name=name, file=file), hint.format(name=name, file=file))

    # -- running -----------------------------------------------------------------------------------------------
    @property
    def runnable(self) -> Callable[..., Any]:
        """What to call for outputs."""
        return self.model

    @contextlib.contextmanager
    def evaluating(self) -> Iterator[Callable[..., Any]]:
        """The runnable in eval mode for the block (every module's own flag restored afterwards)."""
        if self.has_modes:
            with eval_mode(self.runnable) as model:
                yield model
        else:
            yield self.runnable

    def was_training(self) -> bool:
        """Handed over in training mode (meaningless, so False, when the mode is part of the graph)."""
        return self.has_modes and any(m.training for m in self.runnable.modules())

    @property
    def fixed_batch(self) -> bool:
        return False

    def input_specs(self) -> list[InputSpec] | None:
        """The inputs the model declares (None: it does not say)."""
        return None

    def specs(self, given: list[InputSpec], missing: str) -> list[InputSpec]:
        """``given`` (``--input-shape``) when there are any, else the inputs the model declares; neither is an
        :class:`InputSpecError` whose message is ``missing``."""
        specs = list(given) or self.input_specs() or []
        if not specs:
            raise InputSpecError(missing, SHAPE_HINT)
        return specs

    @property
    def subject(self) -> nn.Module | None:
        """The module the audit inspects (statistics and probes), None when there is none."""
        runnable = self.runnable
        return runnable if isinstance(runnable, nn.Module) else None

    def tensor_host(self) -> TensorHost:
        """A host over the model's own tensors, to read them by the paths discovery gave (``bnfold inspect``)."""
        return self.host(self.runnable)

    # -- folding -----------------------------------------------------------------------------------------------
    def discover(self, reference: Any, draws: list[tuple[torch.Tensor, ...]]) -> Discovery:
        raise NotImplementedError

    def plan(self, given: tuple[torch.Tensor, ...] | None, specs: list[InputSpec], seed: int) -> Discovery:
        """Which BN folds into what, without changing anything (the plan :meth:`fuse` applies)."""
        raise NotImplementedError

    def fuse(self, given: tuple[torch.Tensor, ...] | None, specs: list[InputSpec], *, atol: float | None,
             rtol: float | None, seed: int, reference: Reference | None = None) -> FuseResult:
        """Fold a copy and prove it against this model (see :func:`bnfold.fuse.fuse`)."""
        raise NotImplementedError

    def finish(self, folded: Any, inputs: tuple[torch.Tensor, ...]) -> Any:
        """The folded working copy as the result the user gets (same kind as the input)."""
        return folded


class TorchAdapter(Adapter):
    """The kinds that run in PyTorch: folded on a copy and proven against the eval model (:mod:`bnfold.fold.prove`)."""

    def plan(self, given: tuple[torch.Tensor, ...] | None, specs: list[InputSpec], seed: int) -> Discovery:
        specs = self.specs(specs, "no example inputs were given")
        return prove.plan_torch(self, given, specs, seed)

    def fuse(self, given: tuple[torch.Tensor, ...] | None, specs: list[InputSpec], *, atol: float | None,
             rtol: float | None, seed: int, reference: Reference | None = None) -> FuseResult:
        specs = self.specs(specs, "no example inputs were given")
        return prove.fuse_torch(self, given, specs, atol=atol, rtol=rtol, seed=seed, reference=reference)
