"""Calibration data for ``bnfold recalibrate`` and ``bnfold verify --data``.

``--data`` takes a ``.npy`` array, an ``.npz`` archive (the array named ``x``, ``inputs``, ``data`` or
``images``, else its only array), a folder of images (PNG/JPEG..., read with Pillow, scaled to 0..1, channels
first), or ``module:function`` returning an iterable of batches (tensors or ``(inputs, labels)`` tuples).
Under ``torch.distributed`` every process takes every world-size-th sample, its shard.

Everything that can go wrong with the user's data becomes a :class:`DataError` naming the file (or the
``module:function``) and the reason; values (NaN/inf) are checked where every kind of data passes, in
:mod:`bnfold.recalibrate`.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bnfold.errors import BnfoldError, DataError, first_line

_NPZ_KEYS = ("x", "inputs", "data", "images")
_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
_NPZ_HINT = "save the inputs under the name x: np.savez(path, x=inputs)"
_NUMERIC_KINDS = "biuf"  # numpy dtype kinds torch can take as model inputs: bool, int, unsigned, float


def _shard() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _array_batches(array: np.ndarray, source: Path, batch_size: int,
                   dtype: torch.dtype) -> Callable[[], Iterable[torch.Tensor]]:
    _check_array(array, source)
    rank, world = _shard()
    tensor = _cast(array[rank::world], source, dtype)
    return lambda: tensor.split(batch_size)


def _check_array(array: np.ndarray, source: Path) -> None:
    """An array of inputs has a batch axis, at least one sample, and numbers in it."""
    if array.dtype.kind not in _NUMERIC_KINDS:
        raise DataError(f"{source}: the array has dtype {array.dtype}, not numbers the model can take",
                        "save the inputs as a float (or integer) array")
    if array.ndim == 0:
        raise DataError(f"{source}: the array is a single number, not a batch of inputs",
                        "save the inputs batch first: shape (N, C, H, W)")
    if array.shape[0] == 0:
        raise DataError(f"{source}: the array is empty (shape {array.shape})",
                        "save at least one input, batch first: shape (N, C, H, W)")


def _cast(array: np.ndarray, source: Path, dtype: torch.dtype) -> torch.Tensor:
    """The array in the model's dtype; refuses finite values that the cast turns into inf (float16: >65504)."""
    tensor = torch.from_numpy(np.ascontiguousarray(array)).to(dtype)
    if dtype.is_floating_point and not bool(torch.isfinite(tensor).all()) and bool(np.isfinite(array).all()):
        largest = float(np.abs(array).max())
        raise DataError(f"{source}: values up to {largest:.3g} overflow the model's dtype {dtype}",
                        "scale the inputs as the model was trained on, or use a float32 model")
    return tensor


def load_data(spec: str, batch_size: int = 64, dtype: torch.dtype = torch.float32) -> Callable[[], Iterable[Any]]:
    """A callable returning a fresh iterable of batches (the layer-by-layer method passes over it per BN)."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise DataError(f"--batch-size must be a positive integer, got {batch_size!r}", "e.g. --batch-size 64")
    path = Path(spec)
    if path.suffix in (".npy", ".npz") and not path.exists():
        raise DataError(f"--data {spec!r}: no such file", "check the path (relative to the working directory)")
    if path.suffix == ".npy" and path.is_file():
        return _array_batches(_load_npy(path), path, batch_size, dtype)
    if path.suffix == ".npz" and path.is_file():
        return _array_batches(_load_npz(path), path, batch_size, dtype)
    if path.is_dir():
        return _array_batches(_load_images(path), path, batch_size, dtype)
    if ":" in spec and not path.exists():
        return _load_callable(spec)
    raise DataError(f"--data {spec!r}: not a .npy/.npz file, an image folder or module:function",
                    "e.g. --data calib.npz, --data images/, --data mypkg.data:calibration_batches")


def _load_npy(path: Path) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except Exception as exc:
        raise DataError(f"{path}: cannot read it as a .npy array: {first_line(exc, 200)}",
                        "write the inputs with np.save(path, inputs) (numbers, not objects)") from None


def _load_npz(path: Path) -> np.ndarray:
    try:
        archive = np.load(path, allow_pickle=False)
    except Exception as exc:
        raise DataError(f"{path}: cannot read it as a .npz archive: {first_line(exc, 200)}", _NPZ_HINT) from None
    names = archive.files
    if not names:
        raise DataError(f"{path}: the archive holds no arrays", _NPZ_HINT)
    key = next((k for k in _NPZ_KEYS if k in names), names[0] if len(names) == 1 else None)
    if key is None:
        raise DataError(f"{path}: holds {', '.join(names)}; bnfold looks for one of {', '.join(_NPZ_KEYS)}",
                        _NPZ_HINT)
    try:
        return archive[key]
    except Exception as exc:  # a damaged member (bad zip entry, object array): the archive's own reason
        raise DataError(f"{path}: cannot read its array {key!r}: {first_line(exc, 200)}", _NPZ_HINT) from None


def _load_images(folder: Path) -> np.ndarray:
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in _IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise DataError(f"{folder}: no image files ({', '.join(sorted(_IMAGE_SUFFIXES))})",
                        "point --data at the folder that holds the images, or save the inputs as a .npy array")
    arrays = [_read_image(file) for file in files]
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1:
        raise DataError(f"{folder}: images of different shapes {sorted(shapes)[:3]}", "resize them to one size first")
    return np.stack(arrays)


def _read_image(file: Path) -> np.ndarray:
    """One image as a channels-first float32 array scaled to 0..1."""
    from PIL import Image

    try:
        with Image.open(file) as image:
            array = np.asarray(image, dtype=np.float32) / 255.0
    except Exception as exc:  # Pillow reports a bad file as OSError, SyntaxError, ValueError or its own errors
        raise DataError(f"{file}: cannot read it as an image: {first_line(exc, 200)}",
                        "remove the file from the folder, or give it a suffix that is not an image's") from None
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)


def _load_callable(spec: str) -> Callable[[], Iterable[Any]]:
    """``module:function``, wrapped so that what it raises or returns wrongly becomes a DataError."""
    module_name, _, attr = spec.partition(":")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # not found, or the module itself raised while importing
        raise DataError(f"--data {spec!r}: cannot import {module_name!r}: {type(exc).__name__}: "
                        f"{first_line(exc, 200)}", "run bnfold where the module is importable") from exc
    if not hasattr(module, attr):
        raise DataError(f"--data {spec!r}: module {module_name!r} has no attribute {attr!r}",
                        "name a function that returns the calibration batches: --data module:function")
    function = getattr(module, attr)
    if not callable(function):
        raise DataError(f"--data {spec!r} is a {type(function).__name__}, not a function",
                        "name a function that returns the calibration batches: --data module:function")
    return lambda: _call(spec, function)


def _call(spec: str, function: Callable[[], Any]) -> Iterator[Any]:
    """One pass: call ``function`` and yield its batches; what the user's code raises becomes a DataError."""
    try:
        batches = function()
        if not isinstance(batches, Iterable):
            raise DataError(f"--data {spec!r} returned a {type(batches).__name__}, not an iterable of batches",
                            "return a list of tensors, a DataLoader, or yield (inputs, labels) batches")
        yield from batches
    except BnfoldError:  # already explained (ours above, or the function loads data through bnfold)
        raise
    except Exception as exc:
        raise DataError(f"--data {spec!r} raised {type(exc).__name__}: {first_line(exc, 200)}",
                        "fix the function (rerun with --debug to see its traceback)") from exc
