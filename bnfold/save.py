"""Write a folded model in the format it came in, atomically (temp file in the same folder + rename).

Three things every output gets, whatever the format:

1. The mode a plain ``open(path, "w")`` would give (``0o666 & ~umask``), or the mode of the file it replaces.
   ``mkstemp`` creates its file as 0600 and the rename keeps that, which would lock out a serving or CI user
   other than the writer.
2. Models are serialised into memory first and written with plain Python file writes. torch's C++ writers
   abort the process (``.pt2``) or fail with "unexpected pos" (``torch.save``) when the disk is full or a
   file size limit is hit; Python writes raise an ``OSError`` that becomes an :class:`OutputError` with the
   OS's reason. The cost is one in-memory copy of the serialised model.
3. On any failure, ``KeyboardInterrupt`` and ``SystemExit`` from a signal handler included, the temporary
   file (``.<name>.XXXX.tmp<suffix>`` next to the target) is removed and the target is left as it was.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import stat
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from bnfold.errors import OutputError

#: What to do about the write failures a user can fix; other errors get the OS's reason only.
_HINTS = {
    errno.ENOSPC: "free some space on that file system or write to another one",
    errno.EDQUOT: "free some space within your disk quota or write to another file system",
    errno.EFBIG: "raise the file size limit (`ulimit -f`) or write to a file system that allows larger files",
    errno.EACCES: "write to a folder you have write permission for",
    errno.EPERM: "write to a folder you have write permission for",
    errno.EROFS: "the file system is mounted read-only; write to another one",
}

_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux: ``/proc/self/status``)."""
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    # Elsewhere the only way to read the umask is to set it. While it is briefly 0o077, files other threads
    # create are private rather than public; the lock keeps two readers here from restoring the wrong value.
    with _UMASK_LOCK:
        umask = os.umask(0o077)
        os.umask(umask)
    return umask


def output_mode(path: Path) -> int:
    """The permission bits ``path`` should get: those of the file it replaces, else ``0o666 & ~umask``.

    Set-user/group-ID and sticky bits of a replaced file are not carried over to the new content.
    """
    try:
        return stat.S_IMODE(os.stat(path).st_mode) & 0o777
    except FileNotFoundError:
        return 0o666 & ~current_umask()


def _fsync(path: Path | str, flags: int = os.O_RDONLY) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_folder(folder: Path) -> None:
    """Make a rename durable; best effort, since some file systems and platforms refuse to sync folders."""
    with contextlib.suppress(OSError):
        _fsync(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))


def _new_temp_file(path: Path) -> Path:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(fd)
    return Path(tmp)


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; it replaces ``path`` only if the block succeeds.

    Missing parent folders are created first, as export tools do (``-o out/model.onnx``), and removed again
    if the write fails. On success the new file is synced to disk and given :func:`output_mode` before the
    rename. On any exception, ``BaseException`` included, the temporary file is removed and ``path`` is
    untouched. ``OSError`` is passed on as is; :func:`write_atomic` translates it.
    """
    path = Path(path)
    created = _make_folders(path)
    try:
        tmp = _new_temp_file(path)
    except BaseException:
        _remove_folders(created)
        raise
    try:
        yield tmp
        _fsync(tmp)  # else a crash soon after the rename can leave an empty file under the target's name
        # After writing, not before: a mode without owner write (a replaced 0o444 file) would block the writer.
        os.chmod(tmp, output_mode(path))
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        _remove_folders(created)
        raise
    _fsync_folder(path.parent)


def _make_folders(path: Path) -> list[Path]:
    """Create the missing folders above ``path``, outermost first; the ones created, to undo on failure."""
    missing = []
    for folder in path.parents:
        if folder.is_dir():
            break
        if folder.exists() or folder.is_symlink():
            raise OutputError(f"cannot write {path}: {folder} is not a folder", "pass a path inside a folder")
        missing.append(folder)
    for folder in reversed(missing):
        try:
            folder.mkdir()
        except BaseException:
            _remove_folders([f for f in reversed(missing) if f != folder and f.is_dir()])
            raise
    return list(reversed(missing))


def _remove_folders(created: list[Path]) -> None:
    """Remove the folders :func:`_make_folders` created, innermost first, where they are still empty."""
    for folder in reversed(created):
        with contextlib.suppress(OSError):
            folder.rmdir()


def output_error(path: Path, exc: OSError) -> OutputError:
    """``cannot write <path>: <the OS's reason>``, with a hint for the failures a user can fix."""
    reason = os.strerror(exc.errno) if exc.errno else (str(exc) or type(exc).__name__)
    return OutputError(f"cannot write {path}: {reason}", _HINTS.get(exc.errno))


def write_atomic(path: Path, writer: Callable[[str], None]) -> None:
    """Call ``writer(temporary_path)``, then move the result to ``path`` (see :func:`atomic_path`).

    Raises :class:`OutputError` when the file cannot be written. ``writer`` should write with Python file
    objects, whose failures are ``OSError``; to write bytes, use :func:`write_bytes_atomic`.
    """
    try:
        with atomic_path(path) as tmp:
            writer(str(tmp))
    except OSError as exc:
        raise output_error(path, exc) from None


def _write_all(path: str, data: bytes | memoryview) -> None:
    # Unbuffered: each write() is one system call, and a short write (a size limit reached) is retried, so
    # that the next call reports the error instead of it being lost.
    with open(path, "wb", buffering=0) as file:
        view = memoryview(data)
        while view:
            view = view[file.write(view):]


def write_bytes_atomic(path: Path, data: bytes | memoryview) -> None:
    """Write ``data`` to ``path`` atomically; :class:`OutputError` when it cannot be written."""
    write_atomic(path, lambda tmp: _write_all(tmp, data))


def _state_copy(model: Any) -> dict[str, torch.Tensor]:
    """Contiguous copies of the state dict's tensors, each with its own storage: a view must not drag its
    whole storage into the file (torch.save), and safetensors refuses shared or non-contiguous tensors."""
    return {k: v.detach().clone(memory_format=torch.contiguous_format) for k, v in model.state_dict().items()}


def serialize_model(model: Any, fmt: str, example_inputs: tuple[torch.Tensor, ...] | None = None) -> memoryview:
    """The bytes of ``model`` saved as ``fmt`` (see :func:`save_model`), serialised in memory."""
    if fmt == "safetensors":
        from safetensors.torch import save

        return memoryview(save(_state_copy(model)))
    buffer = io.BytesIO()
    if fmt == "torchscript":
        torch.jit.save(model, buffer)
    elif fmt == "export":
        is_program = isinstance(model, torch.export.ExportedProgram)
        torch.export.save(model if is_program else torch.export.export(model, example_inputs), buffer)
    elif fmt == "pickle":
        torch.save(model, buffer)
    elif fmt == "state_dict":
        torch.save(_state_copy(model), buffer)
    else:
        raise ValueError(f"unknown output format {fmt!r}")
    return buffer.getbuffer()  # no copy of what may be a large model


def save_model(model: Any, fmt: str, path: Path, example_inputs: tuple[torch.Tensor, ...] | None = None) -> str:
    """Save ``model`` as ``fmt``: ``torchscript``, ``export`` (``.pt2``), ``pickle``, ``state_dict`` or
    ``safetensors``, atomically (see the module docstring).

    Returns the format written. An ``nn.Module`` saved as ``export`` is exported on ``example_inputs`` first.
    Raises :class:`OutputError` when the file cannot be written.
    """
    write_bytes_atomic(path, serialize_model(model, fmt, example_inputs))
    return fmt


# -- no output may be an input or another output ----------------------------------------------------------
def _identity(path: Path) -> tuple[Any, ...]:
    """What makes two paths the same file: the inode when it exists (hard links, symlinks), else the real path."""
    try:
        st = path.stat()
        return ("inode", st.st_dev, st.st_ino)
    except OSError:
        return ("path", os.path.realpath(path))


def check_paths(inputs: dict[str, Path | None], outputs: dict[str, Path | None]) -> None:
    """Refuse an output that is an input, an existing folder, or the same file as another output.

    Keys are how the user named each path (``MODEL``, ``--json``...), for the message.
    """
    seen: dict[tuple[Any, ...], str] = {}
    for label, path in inputs.items():
        if path is not None:
            seen.setdefault(_identity(Path(path)), label)
            seen.setdefault(("path", os.path.realpath(path)), label)
    for label, path in outputs.items():
        if path is None:
            continue
        path = Path(path)
        if path.is_dir():
            raise OutputError(f"{label} {path} is a folder", f"pass a file name for {label}")
        for key in (_identity(path), ("path", os.path.realpath(path))):
            if key in seen:
                other = seen[key]
                what = "the input" if other in inputs else "also the output of"
                raise OutputError(f"{label} {path} is {what} {other}: bnfold never overwrites its inputs, and writes "
                                  "each output to its own file", f"pass another path for {label}")
        seen[_identity(path)] = seen[("path", os.path.realpath(path))] = label


# -- what a command writes, and where by default ------------------------------------------------------------
#: The suffix of each output format, for default output names.
SUFFIXES = {"torchscript": ".pt", "export": ".pt2", "pickle": ".pt", "state_dict": ".pt", "safetensors": ".safetensors",
            "onnx": ".onnx"}
#: Input formats that hold weights only: their folded model is a ``.pt2`` program, or with ``keep_structure`` a
#: state dict for the same architecture.
WEIGHTS_ONLY = ("state_dict", "safetensors")


def fused_format(input_format: str, keep_structure: bool) -> str:
    """The format ``bnfold fuse`` writes: the input's, except a state dict becomes a ``.pt2`` program (unless
    ``keep_structure``)."""
    return input_format if keep_structure or input_format not in WEIGHTS_ONLY else "export"


def derived_path(model_path: Path, tag: str, fmt: str) -> Path:
    """``MODEL`` with ``.tag`` before the suffix of ``fmt`` (``model.fused.pt2``)."""
    return model_path.with_name(f"{model_path.stem}.{tag}{SUFFIXES[fmt]}")
