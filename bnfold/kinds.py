"""One adapter per model kind: the only place that decides what kind a model is and what follows from it.

A kind answers, for ``fuse``, ``verify``, ``export`` and ``inspect``: what runs (and whether train/eval modes
exist), whether the batch size is fixed, what input it declares, how its BatchNorms are found (into the shared
pairing graph of :mod:`bnfold.discover.graph`), which host writes folds into its tensors by name, what the
folded result becomes, and how it is saved. Adding a kind is adding one class here and one line in
:func:`adapter_for`.

=============  ==========================  ======  ===========  ==============================================
kind           model                       modes   fixed batch  folds written by
=============  ==========================  ======  ===========  ==============================================
``module``     ``nn.Module``               yes     no           ModuleHost (BN -> Identity) / KeepStructureHost
``torchscript````torch.jit.ScriptModule``  yes     no           ScriptHost (BN neutralised in place)
``export``     ``ExportedProgram``         no      from graph   GraphHost (BN node erased), re-exported
``onnx``       ``onnx.ModelProto``         no      from graph   OnnxHost (see :mod:`bnfold.onnx`)
=============  ==========================  ======  ===========  ==============================================
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import torch
from torch import nn

from bnfold.discover import discover, fx, script
from bnfold.discover.graph import Discovery, pair, unrecognised
from bnfold.fold.apply import GraphHost, KeepStructureHost, ModuleHost, ScriptHost
from bnfold.inputs import InputSpec
from bnfold.runtime import eval_mode


def _stat_paths(model: nn.Module) -> list[str]:
    return [name for name, _ in model.named_buffers() if name.endswith("running_mean")]


class Adapter:
    """What bnfold needs to know about one kind of model. Subclasses set the class attributes."""

    kind: ClassVar[str]
    has_modes: ClassVar[bool] = True  # train()/eval() apply; otherwise the mode is part of the graph
    host: ClassVar[type[ModuleHost]] = ModuleHost
    save_format: ClassVar[str]  # bnfold.save.save_model's format for the folded result

    def __init__(self, model: Any) -> None:
        self.model = model

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

    @property
    def subject(self) -> nn.Module | None:
        """The module the audit inspects (statistics and probes), None when there is none."""
        runnable = self.runnable
        return runnable if isinstance(runnable, nn.Module) else None

    # -- folding -----------------------------------------------------------------------------------------------
    def discover(self, reference: Any, draws: list[tuple[torch.Tensor, ...]]) -> Discovery:
        raise NotImplementedError

    def finish(self, folded: Any, inputs: tuple[torch.Tensor, ...]) -> Any:
        """The folded working copy as the result the user gets (same kind as the input)."""
        return folded


class ModuleAdapter(Adapter):
    kind = "module"
    save_format = "pickle"

    def __init__(self, model: nn.Module, *, method: str = "auto", keep_structure: bool = False) -> None:
        super().__init__(model)
        self.method = method
        self.keep_structure = keep_structure
        self.host = KeepStructureHost if keep_structure else ModuleHost  # type: ignore[misc]

    def discover(self, reference: Any, draws: list[tuple[torch.Tensor, ...]]) -> Discovery:
        # Merging branches changes the architecture: not for a model whose state dict must load into its class.
        return discover(reference, draws, method=self.method, structural=not self.keep_structure)


class ScriptAdapter(Adapter):
    kind = "torchscript"
    host = ScriptHost
    save_format = "torchscript"

    def discover(self, reference: Any, draws: list[tuple[torch.Tensor, ...]]) -> Discovery:
        return unrecognised(script.discover(reference, draws[0]), _stat_paths(reference))


class ExportAdapter(Adapter):
    """A ``torch.export`` program: its graph module runs (always reporting training=True: the mode is baked in)."""

    kind = "export"
    has_modes = False
    host = GraphHost
    save_format = "export"

    def __init__(self, model: torch.export.ExportedProgram) -> None:
        super().__init__(model)
        self._module = model.module()  # built once: it copies the program's graph

    @property
    def runnable(self) -> Callable[..., Any]:
        return self._module

    @property
    def fixed_batch(self) -> bool:
        from bnfold.load import has_static_batch

        return has_static_batch(self.model)

    def input_specs(self) -> list[InputSpec] | None:
        from bnfold.load import program_input_specs

        return program_input_specs(self.model)

    def discover(self, reference: Any, draws: list[tuple[torch.Tensor, ...]]) -> Discovery:
        return unrecognised(pair(fx.graph_nodes(reference, reference), "export"), _stat_paths(reference))

    def finish(self, folded: Any, inputs: tuple[torch.Tensor, ...]) -> Any:
        return torch.export.export(folded, inputs)


class OnnxAdapter(Adapter):
    """An ONNX graph: onnxruntime runs it (see :mod:`bnfold.onnx.fuse`, which proves its folds); no modes."""

    kind = "onnx"
    has_modes = False
    save_format = "onnx"

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
        from bnfold.onnx.fuse import input_specs

        return not input_specs(self.model, None)[1]

    def input_specs(self) -> list[InputSpec] | None:
        from bnfold.onnx.fuse import input_specs

        return input_specs(self.model, None)[0]

    def discover(self, reference: Any, draws: list[tuple[torch.Tensor, ...]]) -> Discovery:
        from bnfold.onnx.fold import discover_graph

        return discover_graph(self.model)


def adapter_for(model: Any, *, method: str = "auto", keep_structure: bool = False) -> Adapter:
    """The adapter of ``model``'s kind: the one place that looks at what a model is."""
    if isinstance(model, Adapter):
        return model
    if type(model).__name__ == "ModelProto" and type(model).__module__.startswith("onnx"):
        return OnnxAdapter(model)
    if isinstance(model, torch.export.ExportedProgram):
        return ExportAdapter(model)
    if isinstance(model, torch.jit.ScriptModule):
        return ScriptAdapter(model)
    if isinstance(model, nn.Module):
        return ModuleAdapter(model, method=method, keep_structure=keep_structure)
    raise TypeError(f"bnfold takes an nn.Module, a ScriptModule, an ExportedProgram or an onnx.ModelProto, not "
                    f"{type(model).__name__}")
