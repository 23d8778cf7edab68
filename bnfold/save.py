"""Write a folded model in the format it came in, atomically (temp file in the same folder + rename)."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from bnfold.errors import OutputError


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; it replaces ``path`` only if the block succeeds."""
    path = Path(path)
    if not path.parent.is_dir():
        raise OutputError(f"cannot write {path}: folder {path.parent} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_atomic(path: Path, writer: Callable[[str], None]) -> None:
    try:
        with atomic_path(path) as tmp:
            writer(str(tmp))
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from None


def save_model(model: Any, fmt: str, path: Path, example_inputs: tuple[torch.Tensor, ...] | None = None) -> str:
    """Save ``model`` as ``fmt``: ``torchscript``, ``export`` (``.pt2``), ``pickle`` or ``state_dict``.

    Returns the format written. An ``nn.Module`` saved as ``export`` is exported on ``example_inputs`` first.
    """
    if fmt == "torchscript":
        write_atomic(path, lambda p: torch.jit.save(model, p))
    elif fmt == "export":
        program = model if isinstance(model, torch.export.ExportedProgram) else torch.export.export(model, example_inputs)
        write_atomic(path, lambda p: torch.export.save(program, p))
    elif fmt == "pickle":
        write_atomic(path, lambda p: torch.save(model, p))
    elif fmt == "state_dict":
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        write_atomic(path, lambda p: torch.save(state, p))
    elif fmt == "safetensors":
        from safetensors.torch import save_file

        state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
        write_atomic(path, lambda p: save_file(state, p))
    else:
        raise ValueError(f"unknown output format {fmt!r}")
    return fmt
