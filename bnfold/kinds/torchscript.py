"""The ``torchscript`` kind: a ``torch.jit.ScriptModule``. Its graph is compiled, so folded BNs are neutralised
in place (exact in fp32) and the module keeps its structure."""

from __future__ import annotations

from typing import Any

import torch

from bnfold.discover import script
from bnfold.discover.graph import Discovery, Fold, unrecognised
from bnfold.kinds.base import TorchAdapter, stat_paths
from bnfold.kinds.module import KeepStructureHost


class ScriptHost(KeepStructureHost):
    """A TorchScript module: its graph is compiled, so BNs are neutralised in place (exact in fp32)."""

    def check(self, fold: Fold) -> None:
        pass  # the scripted forward keeps whatever a BN subclass applies after normalising


class ScriptAdapter(TorchAdapter):
    kind = "torchscript"
    host = ScriptHost

    def discover(self, reference: Any, draws: list[tuple[torch.Tensor, ...]]) -> Discovery:
        return unrecognised(script.discover(reference, draws[0]), stat_paths(reference))
