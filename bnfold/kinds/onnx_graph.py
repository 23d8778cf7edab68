"""The ``onnx`` kind: an ``onnx.ModelProto``. onnxruntime runs it in a child process (no modes: the mode is part of
the graph); folds are written into its initializers by :class:`~bnfold.onnx.graph.OnnxHost` and proven in
onnxruntime (:func:`bnfold.onnx.fuse.fuse_onnx`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import nn

from bnfold.discover.graph import Discovery
from bnfold.fold.result import FuseResult
from bnfold.inputs import InputSpec
from bnfold.kinds.base import Adapter
from bnfold.onnx.fold import discover_graph
from bnfold.onnx.fuse import fuse_onnx, input_specs
from bnfold.onnx.graph import OnnxHost
from bnfold.runtime import Reference


class OnnxAdapter(Adapter):
    kind = "onnx"
    has_modes = False
    runs_in_onnxruntime = True
    host = OnnxHost
    refuses: ClassVar[dict[str, tuple[str, str]]] = {
        "export": ("{name} is already an ONNX graph: there is nothing to export",
                   "bnfold fuse {file} folds it and proves the result in onnxruntime"),
        "verify": ("bnfold.verify takes an ONNX graph by its path (the graph-only checks read the file)",
                   "pass the .onnx file's path, or the torch model with onnx=PATH to compare them"),
    }

    @property
    def runnable(self) -> Callable[..., Any]:
        raise TypeError("an ONNX graph runs in onnxruntime's child process, not as a Python callable")

    def was_training(self) -> bool:
        return False

    @property
    def subject(self) -> nn.Module | None:
        return None

    @property
    def fixed_batch(self) -> bool:
        return not input_specs(self.model, None)[1]

    def input_specs(self) -> list[InputSpec] | None:
        return input_specs(self.model, None)[0]

    def specs(self, given: list[InputSpec], missing: str) -> list[InputSpec]:
        """``given`` as it is: discovery needs no inputs, and the graph's own declaration is read (and ``given``
        checked against it) where the graph runs (:func:`bnfold.onnx.fuse.input_specs`)."""
        return list(given)

    def tensor_host(self) -> OnnxHost:
        return OnnxHost(self.model)

    def discover(self, reference: Any, draws: list[tuple[torch.Tensor, ...]]) -> Discovery:
        return discover_graph(self.model)

    def plan(self, given: tuple[torch.Tensor, ...] | None, specs: list[InputSpec], seed: int) -> Discovery:
        return discover_graph(self.model)  # the graph alone says what folds: no inputs needed

    def fuse(self, given: tuple[torch.Tensor, ...] | None, specs: list[InputSpec], *, atol: float | None,
             rtol: float | None, seed: int, reference: Reference | None = None) -> FuseResult:
        return fuse_onnx(self.model, None, specs or None, atol=atol, rtol=rtol, seed=seed)
