"""Load a model file, recognising its format from its content (never its extension).

Formats: TorchScript archives (``torch.jit.save``), ``torch.export`` programs (``torch.export.save``),
state dicts and training checkpoints (``torch.save``; with ``--arch``), ``.safetensors`` (with ``--arch``),
and whole pickled modules (``torch.save(model)``; refused unless ``trust_pickle``, since loading one runs
code from the file). Everything else is loaded with ``weights_only=True``.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import os
import sys
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from bnfold import trust as gate
from bnfold.errors import ArchError, LoadError, UnsafePickleError, first_line
from bnfold.inputs import InputSpec
from bnfold.kinds import adapter_for
from bnfold.onnx.io import load_onnx
from bnfold.sniff import sniff

Format = Literal["torchscript", "export", "state_dict", "safetensors", "pickle", "onnx"]
_NESTED_KEYS = ("state_dict", "model_state_dict", "model")
_PREFIXES = ("module.", "model.", "_orig_mod.")
PICKLE_HINT = ("if you trust the file, pass --trust; better, save a state dict (torch.save(model.state_dict())) "
               "and pass --arch, or save a torch.export program (.pt2)")


@dataclass
class Loaded:
    model: Any  # nn.Module, torch.jit.ScriptModule, torch.export.ExportedProgram or onnx.ModelProto
    format: Format
    path: Path
    arch: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def input_specs(self) -> list[InputSpec] | None:
        """The inputs the file declares (a ``.pt2`` program, an ONNX graph), as the model's kind reads them."""
        return adapter_for(self.model).input_specs()


@contextlib.contextmanager
def _quiet_torch_logs():
    """torch's loaders log tracebacks ("check the warnings above") for damaged files; bnfold's error says it all."""
    previous = logging.root.manager.disable
    logging.disable(logging.CRITICAL)
    try:
        yield
    finally:
        logging.disable(previous)


def _check_archive(path: Path, kind: str, trust: bool) -> None:
    """Declared sizes always; what would run code unless trusted. Nothing from the file has run yet."""
    if not kind.startswith("zip:"):
        return
    with zipfile.ZipFile(path) as archive:
        gate.check_zip_sizes(str(path), archive)
        if trust:
            return
        if kind == "zip:export":
            gate.check_pt2_archive(str(path), archive)
        elif kind == "zip:torchscript":
            gate.check_torchscript_source(str(path), archive)


def load(path: str | os.PathLike[str], *, arch: str | None = None, arch_kwargs: str | None = None,
         trust: bool = False, trust_pickle: bool = False, code_root: str | os.PathLike[str] | None = None) -> Loaded:
    """Load ``path``. Without ``trust`` (``trust_pickle`` is its old name), anything that would run code from the
    file is refused before it runs (see :mod:`bnfold.trust`). ``arch`` (and the modules a trusted pickle refers
    to) are imported from ``code_root``, the current folder by default."""
    trust = trust or trust_pickle
    path = Path(path)
    if not path.is_file():
        raise LoadError(f"{path}: no such file" if not path.exists() else f"{path}: not a regular file")
    if not os.access(path, os.R_OK):
        raise LoadError(f"{path}: permission denied", "make the file readable by this user")
    kind = sniff(path)
    if kind == "zip:damaged":
        raise LoadError(f"{path}: a damaged zip archive (truncated, or its central directory is broken)",
                        "the file was probably cut short while copying or saving; copy or save it again")
    _check_archive(path, kind, trust)
    try:
        with _quiet_torch_logs(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's and onnx's warnings about the file: bnfold's error says it
            return _load_kind(path, kind, arch, arch_kwargs, trust, Path(code_root or os.getcwd()))
    except LoadError:
        raise
    except Exception as exc:  # torch's loaders raise many types for damaged files
        raise LoadError(f"{path}: cannot read it as a {_KIND_NAMES.get(kind, kind)}: {first_line(exc)}",
                        "the file may be truncated or damaged; re-save it") from exc


_KIND_NAMES = {"zip:torchscript": "TorchScript archive", "zip:export": "torch.export program",
               "zip:torch": "torch.save checkpoint", "pickle": "pickle", "safetensors": "safetensors file",
               "onnx": "ONNX model"}


def _load_kind(path: Path, kind: str, arch: str | None, arch_kwargs: str | None, trust: bool, root: Path) -> Loaded:
    if kind == "zip:torchscript":
        module = torch.jit.load(str(path), map_location="cpu")
        if not trust:
            gate.check_operators(str(path), gate.script_operators(module), "TorchScript code")
        return Loaded(module, "torchscript", path)
    if kind == "zip:export":
        program = torch.export.load(str(path))
        if not trust:
            gate.check_operators(str(path), gate.program_operators(program), "graph")
        return Loaded(program, "export", path)
    if kind == "safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path), device="cpu")
        return _with_arch(state, path, "safetensors", arch, arch_kwargs, root)
    if kind in ("zip:torch", "pickle"):
        return _load_torch_file(path, arch, arch_kwargs, trust, root)
    if kind == "onnx":
        return Loaded(load_onnx(path), "onnx", path)  # external data only from the model's own folder
    raise LoadError(f"{path}: not a model file bnfold knows (first bytes {_head(path)!r})",
                    "expected a TorchScript archive, a torch.export .pt2 program, a torch.save checkpoint, a "
                    ".safetensors file or an ONNX model")


def _load_torch_file(path: Path, arch: str | None, arch_kwargs: str | None, trust: bool, root: Path) -> Loaded:
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        if "weights_only" not in str(exc) and "Unsupported global" not in str(exc):
            raise
        if not trust:
            raise UnsafePickleError(
                f"{path}: refusing to unpickle it: the file holds Python objects ({_unsupported_global(exc)}) and "
                "loading it would run code from the file", PICKLE_HINT) from None
        importable(root)
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=False)
        except (ImportError, AttributeError) as exc:
            raise LoadError(f"{path}: the pickle refers to code that cannot be imported: {first_line(exc)}",
                            "run bnfold from the directory that contains the model's package, or install it") from None
    if isinstance(obj, nn.Module):
        return Loaded(obj, "pickle", path, arch=None)
    return _with_arch(obj, path, "state_dict", arch, arch_kwargs, root)


def _with_arch(obj: Any, path: Path, fmt: Format, arch: str | None, arch_kwargs: str | None, root: Path) -> Loaded:
    state, where = extract_state_dict(obj, path)
    if arch is None:
        raise ArchError(f"{path} holds a state dict ({len(state)} tensors), not a model",
                        "pass --arch package.module:factory (a callable returning the nn.Module), e.g. "
                        "--arch models.zoo:resnet_digits")
    model = build_arch(arch, arch_kwargs, root)
    notes = [f"weights read from the {where!r} entry"] if where else []
    notes += load_into(model, state, path, arch)
    return Loaded(model.eval(), fmt, path, arch=arch, notes=notes)  # a state dict carries no train/eval mode


def extract_state_dict(obj: Any, path: Path) -> tuple[dict[str, torch.Tensor], str | None]:
    """A flat ``{name: tensor}`` dict from a state dict or a training checkpoint that nests one."""
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return dict(obj), None
    if isinstance(obj, dict):
        for key in _NESTED_KEYS:
            inner = obj.get(key)
            if isinstance(inner, dict) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
                return dict(inner), key
        keys = ", ".join(repr(k) for k in list(obj)[:6])
        raise LoadError(f"{path}: a checkpoint dict without a state dict (keys: {keys})",
                        f"bnfold looks for tensors at the top level or under {', '.join(_NESTED_KEYS)}")
    raise LoadError(f"{path}: holds a {type(obj).__name__}, not a model or a state dict")


def build_arch(arch: str, arch_kwargs: str | None, root: str | os.PathLike[str] | None = None) -> nn.Module:
    """Import ``package.module:factory`` (from ``root``, the current directory by default, too) and call it."""
    module_name, sep, attr = arch.partition(":")
    if not sep or not module_name or not attr:
        raise ArchError(f"--arch {arch!r} is not of the form package.module:factory", "e.g. --arch models.zoo:resnet_digits")
    kwargs: dict[str, Any] = {}
    if arch_kwargs:
        try:
            kwargs = json.loads(arch_kwargs)
        except json.JSONDecodeError as exc:
            raise ArchError(f"--arch-kwargs is not valid JSON: {exc.msg} at character {exc.pos}",
                            "e.g. --arch-kwargs '{\"num_classes\": 10}'") from None
        if not isinstance(kwargs, dict):
            raise ArchError(f"--arch-kwargs must be a JSON object, got {type(kwargs).__name__}")
    importable(Path(root or os.getcwd()))
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except ImportError as exc:
        raise ArchError(f"--arch {arch!r}: cannot import {module_name!r}: {first_line(exc)}",
                        "run bnfold from the directory that contains the package, or install it") from None
    except AttributeError:
        raise ArchError(f"--arch {arch!r}: module {module_name!r} has no attribute {attr!r}") from None
    try:
        model = factory(**kwargs)
    except Exception as exc:
        raise ArchError(f"--arch {arch!r}: calling it with {kwargs} failed: {type(exc).__name__}: {first_line(exc)}",
                        "pass its arguments as JSON with --arch-kwargs") from None
    if not isinstance(model, nn.Module):
        raise ArchError(f"--arch {arch!r} returned a {type(model).__name__}, not an nn.Module")
    return model


def importable(root: Path) -> None:
    """Like ``python -m``: model code usually lives in the user's project, so its folder is importable."""
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))


def load_into(model: nn.Module, state: dict[str, torch.Tensor], path: Path, arch: str) -> list[str]:
    """Load ``state`` strictly, stripping DataParallel/Lightning/compile prefixes when that makes it fit."""
    expected = model.state_dict()
    best, stripped = state, ""
    for prefix in ("", *_PREFIXES, *(a + b for a in _PREFIXES for b in _PREFIXES if a != b)):
        candidate = _strip(state, prefix)
        if candidate is not None and len(candidate.keys() & expected.keys()) > len(best.keys() & expected.keys()):
            best, stripped = candidate, prefix
    missing = sorted(expected.keys() - best.keys())
    unexpected = sorted(best.keys() - expected.keys())
    mismatched = [f"{k}: file {tuple(best[k].shape)} vs model {tuple(expected[k].shape)}"
                  for k in sorted(expected.keys() & best.keys()) if best[k].shape != expected[k].shape]
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        if mismatched:
            parts.append(f"{len(mismatched)} with another shape (e.g. {mismatched[0]})")
        raise LoadError(f"{path} does not match --arch {arch}: " + "; ".join(parts) + " keys",
                        "check --arch and --arch-kwargs against the code that trained the model")
    model.load_state_dict(best, strict=True)
    return [f"stripped the {stripped!r} prefix from the state dict keys"] if stripped else []


def _strip(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor] | None:
    if not prefix:
        return state
    if not all(k.startswith(prefix) for k in state):
        return None
    return {k[len(prefix):]: v for k, v in state.items()}


def _unsupported_global(exc: Exception) -> str:
    text = str(exc)
    marker = "Unsupported global: GLOBAL "
    if marker in text:
        return text.split(marker, 1)[1].split()[0]
    return "objects outside the weights_only allow-list"


def _head(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read(8)
