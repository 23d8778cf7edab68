"""Calibration data for ``bnfold recalibrate`` and ``bnfold verify --data``.

``--data`` takes a ``.npy`` array, an ``.npz`` archive (the array named ``x``, ``inputs``, ``data`` or
``images``, else its only array), a folder of images (PNG/JPEG..., read with Pillow, scaled to 0..1, channels
first), or ``module:function`` returning an iterable of batches (tensors or ``(inputs, labels)`` tuples).
Under ``torch.distributed`` every process takes every world-size-th sample, its shard.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bnfold.errors import BnfoldError, first_line

_NPZ_KEYS = ("x", "inputs", "data", "images")
_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


class DataError(BnfoldError):
    """The calibration data cannot be read."""


def _shard() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _array_batches(array: np.ndarray, batch_size: int, dtype: torch.dtype) -> Callable[[], Iterable[torch.Tensor]]:
    rank, world = _shard()
    tensor = torch.from_numpy(np.ascontiguousarray(array[rank::world])).to(dtype)
    return lambda: tensor.split(batch_size)


def load_data(spec: str, batch_size: int = 64, dtype: torch.dtype = torch.float32) -> Callable[[], Iterable[Any]]:
    """A callable returning a fresh iterable of batches (the layer-by-layer method passes over it per BN)."""
    path = Path(spec)
    if path.suffix == ".npy" and path.is_file():
        return _array_batches(_load_npy(path), batch_size, dtype)
    if path.suffix == ".npz" and path.is_file():
        return _array_batches(_load_npz(path), batch_size, dtype)
    if path.is_dir():
        return _array_batches(_load_images(path), batch_size, dtype)
    if ":" in spec and not path.exists():
        return _load_callable(spec)
    raise DataError(f"--data {spec!r}: not a .npy/.npz file, an image folder or module:function",
                    "e.g. --data calib.npz, --data images/, --data mypkg.data:calibration_batches")


def _load_npy(path: Path) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except Exception as exc:
        raise DataError(f"{path}: cannot read it as a .npy array: {first_line(exc, 200)}") from None


def _load_npz(path: Path) -> np.ndarray:
    try:
        archive = np.load(path, allow_pickle=False)
    except Exception as exc:
        raise DataError(f"{path}: cannot read it as a .npz archive: {first_line(exc, 200)}") from None
    names = archive.files
    key = next((k for k in _NPZ_KEYS if k in names), names[0] if len(names) == 1 else None)
    if key is None:
        raise DataError(f"{path}: holds {', '.join(names)}; bnfold looks for one of {', '.join(_NPZ_KEYS)}",
                        "save the inputs under the name x: np.savez(path, x=inputs)")
    return archive[key]


def _load_images(folder: Path) -> np.ndarray:
    from PIL import Image

    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in _IMAGE_SUFFIXES)
    if not files:
        raise DataError(f"{folder}: no image files ({', '.join(sorted(_IMAGE_SUFFIXES))})")
    arrays = []
    for file in files:
        with Image.open(file) as image:
            array = np.asarray(image, dtype=np.float32) / 255.0
        arrays.append(array[None] if array.ndim == 2 else array.transpose(2, 0, 1))
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1:
        raise DataError(f"{folder}: images of different shapes {sorted(shapes)[:3]}", "resize them to one size first")
    return np.stack(arrays)


def _load_callable(spec: str) -> Callable[[], Iterable[Any]]:
    module_name, _, attr = spec.partition(":")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        function = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise DataError(f"--data {spec!r}: {first_line(exc, 200)}") from None
    return function
