"""One adapter per model kind: the only place that decides what kind a model is and what follows from it.

A kind answers, for ``fuse``, ``verify``, ``export`` and ``inspect``: what runs (and whether train/eval modes
exist), whether the batch size is fixed, what input it declares, how its BatchNorms are found (into the shared
pairing graph of :mod:`bnfold.discover.graph`), which host writes folds into its tensors by name, how a fold is
proven, what the folded result becomes, and which commands it does not take. Adding a kind is adding one
module here and one line in :func:`adapter_for`.

=============  ==========================  ======  ===========  ==============================================
kind           model                       modes   fixed batch  folds written by
=============  ==========================  ======  ===========  ==============================================
``module``     ``nn.Module``               yes     no           ModuleHost (BN -> Identity) / KeepStructureHost
``torchscript````torch.jit.ScriptModule``  yes     no           ScriptHost (BN neutralised in place)
``export``     ``ExportedProgram``         no      from graph   GraphHost (BN node erased), re-exported
``onnx``       ``onnx.ModelProto``         no      from graph   OnnxHost (proven in onnxruntime)
=============  ==========================  ======  ===========  ==============================================
"""

from __future__ import annotations

from typing import Any

import onnx
import torch
from torch import nn

from bnfold.kinds.base import Adapter
from bnfold.kinds.module import ModuleAdapter
from bnfold.kinds.onnx_graph import OnnxAdapter
from bnfold.kinds.program import ExportAdapter
from bnfold.kinds.torchscript import ScriptAdapter

__all__ = ["Adapter", "ExportAdapter", "ModuleAdapter", "OnnxAdapter", "ScriptAdapter", "adapter_for"]


def adapter_for(model: Any, *, method: str = "auto", keep_structure: bool = False) -> Adapter:
    """The adapter of ``model``'s kind: the one place that looks at what a model is."""
    if isinstance(model, Adapter):
        return model
    if isinstance(model, onnx.ModelProto):
        return OnnxAdapter(model)
    if isinstance(model, torch.export.ExportedProgram):
        return ExportAdapter(model)
    if isinstance(model, torch.jit.ScriptModule):
        return ScriptAdapter(model)
    if isinstance(model, nn.Module):
        return ModuleAdapter(model, method=method, keep_structure=keep_structure)
    raise TypeError(f"bnfold takes an nn.Module, a ScriptModule, an ExportedProgram or an onnx.ModelProto, not "
                    f"{type(model).__name__}")
