"""Read and write ONNX model files, external data included, safely.

Reading: the protobuf is parsed, checked for what bnfold can fold (:func:`bnfold.onnx.graph.check_supported`),
and tensors stored in external files are read into memory. A data path must stay inside the model's folder:
absolute paths, ``..`` and symbolic links that lead out are refused before anything is opened, so a model file
cannot make bnfold read (and then write into its output) a file it was not given.

Writing: protobuf cannot serialise a message of 2 GB or more, so larger models keep their tensors in a data
file, ``<name>.data`` beside ``<name>`` (tensors under 1 KiB stay inline, as onnx does). Both files are
written atomically (:mod:`bnfold.save`): the data file first, then the model that points into it.
"""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath, PureWindowsPath

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import TensorProto, numpy_helper
from onnx.external_data_helper import ExternalDataInfo

from bnfold.errors import LoadError, first_line
from bnfold.onnx.graph import check_supported
from bnfold.save import atomic_path, output_error, write_bytes_atomic
from bnfold.sniff import sniff

#: Protobuf refuses to serialise or parse a message this large or larger.
PROTOBUF_LIMIT = 2**31 - 1
#: Tensors with fewer data bytes stay inline when a model is written with external data.
INLINE_BELOW = 1024
#: Tensors of this size or more start at a multiple of ``ALIGNMENT`` in the data file (memory-mappable).
ALIGN_FROM = 2**20
ALIGNMENT = 4096


def _tensors(graph: onnx.GraphProto) -> list[TensorProto]:
    """Every dense tensor of ``graph``: initializers and node attributes, subgraphs included."""
    found = list(graph.initializer)
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                found.append(attr.t)
            elif attr.type == onnx.AttributeProto.TENSORS:
                found.extend(attr.tensors)
            elif attr.type == onnx.AttributeProto.GRAPH:
                found.extend(_tensors(attr.g))
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    found.extend(_tensors(sub))
    return found


def _all_tensors(model: onnx.ModelProto) -> list[TensorProto]:
    found = _tensors(model.graph)
    for function in model.functions:
        for node in function.node:
            found.extend(a.t for a in node.attribute if a.type == onnx.AttributeProto.TENSOR)
    return found


def _is_external(tensor: TensorProto) -> bool:
    return tensor.HasField("data_location") and tensor.data_location == TensorProto.EXTERNAL


# -- reading -------------------------------------------------------------------------------------------------
def _parse(path: Path) -> onnx.ModelProto:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise LoadError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise LoadError(f"{path}: a folder, not a model file") from None
    except OSError as exc:
        raise LoadError(f"{path}: cannot read it: {os.strerror(exc.errno) if exc.errno else first_line(exc)}") from None
    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)
    except (DecodeError, ValueError, RuntimeError) as exc:
        raise LoadError(f"{path}: not an ONNX model (the protobuf does not parse: {first_line(exc, 120)})",
                        "check that the file is complete, not truncated or a Git LFS pointer") from None
    if not model.HasField("graph") or not model.opset_import:
        raise LoadError(f"{path}: not an ONNX model (no graph or no opset_import)",
                        "pass the .onnx model file itself, not its data file")
    return model


def _info(tensor: TensorProto) -> ExternalDataInfo:
    try:
        info = ExternalDataInfo(tensor)
        offset, length = int(info.offset or 0), None if info.length is None else int(info.length)
    except (TypeError, ValueError) as exc:
        raise LoadError(f"tensor '{tensor.name}': malformed external data entry ({first_line(exc, 120)})",
                        "re-save the model with onnx.save_model(..., save_as_external_data=True)") from None
    if offset < 0 or (length is not None and length < 0):
        raise LoadError(f"tensor '{tensor.name}': negative external data offset or length ({offset}, {length})",
                        "re-save the model with onnx.save_model(..., save_as_external_data=True)")
    return info


def _data_file(folder: Path, tensor: TensorProto) -> Path:
    """The file holding ``tensor``'s data, refused when it lies outside ``folder``."""
    location = _info(tensor).location
    if not location:
        raise LoadError(f"tensor '{tensor.name}' is marked as external data but names no file",
                        "re-save the model with onnx.save_model(..., save_as_external_data=True)")
    hint = ("bnfold reads external data only from the model's own folder: move the data file next to the model "
            "and set its location to the bare file name")
    pure = PurePosixPath(location.replace("\\", "/"))
    if pure.is_absolute() or PureWindowsPath(location).is_absolute() or ".." in pure.parts:
        raise LoadError(f"tensor '{tensor.name}' keeps its data at '{location}', outside the model's folder "
                        f"{folder}", hint)
    target = folder.joinpath(*pure.parts)
    resolved = Path(os.path.realpath(target))
    if not resolved.is_relative_to(Path(os.path.realpath(folder))):
        raise LoadError(f"tensor '{tensor.name}' keeps its data at '{location}', a link to {resolved} outside the "
                        f"model's folder {folder}", hint)
    if not resolved.is_file():
        raise LoadError(f"tensor '{tensor.name}' keeps its data in '{location}', which is missing from {folder}",
                        "copy the data file that came with the model next to it")
    return resolved


#: Element types packed below one byte, and their width in bits (onnx releases add them over time).
_PACKED_BITS = {getattr(TensorProto, name): bits for name, bits in (
    ("INT4", 4), ("UINT4", 4), ("FLOAT4E2M1", 4), ("INT2", 2), ("UINT2", 2), ("FLOAT6E2M3", 6), ("FLOAT6E3M2", 6))
    if hasattr(TensorProto, name)}


def _expected_bytes(tensor: TensorProto) -> int | None:
    """The bytes ``tensor``'s shape and type need in raw form; None when not fixed (strings, unknown types)."""
    if tensor.data_type in (TensorProto.STRING, TensorProto.UNDEFINED):
        return None
    count = int(np.prod(tensor.dims, dtype=np.int64))
    if tensor.data_type in _PACKED_BITS:
        return (count * _PACKED_BITS[tensor.data_type] + 7) // 8
    try:
        return count * np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize
    except (KeyError, TypeError, ValueError):
        return None


def _load_external(model: onnx.ModelProto, folder: Path) -> None:
    """Read every external tensor's bytes into the model (paths checked by :func:`_data_file` first)."""
    external = [t for t in _all_tensors(model) if _is_external(t)]
    files = [_data_file(folder, t) for t in external]  # every path checked before any is opened
    for tensor, path in zip(external, files):
        info = _info(tensor)
        offset = int(info.offset or 0)
        expected = _expected_bytes(tensor)
        length = int(info.length) if info.length is not None else expected
        size = path.stat().st_size
        if offset > size or (length is not None and offset + length > size):
            raise LoadError(f"tensor '{tensor.name}': its data ({length} bytes at offset {offset}) lies past the end "
                            f"of {path.name} ({size} bytes)", "the data file is truncated or belongs to another model")
        if expected is not None and length is not None and length != expected:
            raise LoadError(f"tensor '{tensor.name}': its data file entry has {length} bytes, its shape "
                            f"{list(tensor.dims)} needs {expected}", "the data file belongs to another model")
        with open(path, "rb") as data:
            data.seek(offset)
            tensor.raw_data = data.read(length if length is not None else -1)
        tensor.data_location = TensorProto.DEFAULT
        del tensor.external_data[:]


def load_onnx(path: Path | str) -> onnx.ModelProto:
    """The model at ``path`` with every external tensor read into memory.

    Raises :class:`LoadError` when the file is not an ONNX model, is one bnfold cannot fold (see
    :func:`bnfold.onnx.graph.check_supported`), or keeps data outside its folder or in missing files.
    """
    path = Path(path)
    model = _parse(path)
    check_supported(model)
    _load_external(model, path.parent)
    _check_sizes(model)
    return model


def has_external_data(path: Path | str) -> bool:
    """Whether the model at ``path`` keeps tensors in external files."""
    return any(_is_external(t) for t in _all_tensors(_parse(Path(path))))


def external_data_files(path: Path | str) -> list[Path]:
    """The data files the model at ``path`` reads (inputs too: no output may be written over them).

    Empty for a file that is not an ONNX model (its own loader says why); such a file is not read past its
    first bytes."""
    path = Path(path)
    if not path.is_file() or sniff(path) != "onnx":
        return []
    try:
        model = _parse(path)
        return sorted({_data_file(path.parent, t) for t in _all_tensors(model) if _is_external(t)})
    except LoadError:
        return []


def _check_sizes(model: onnx.ModelProto) -> None:
    """Every tensor holds as many elements as its dims declare (a tensor declaring 10^12 elements on 3 floats
    would otherwise fail deep inside numpy)."""
    for tensor in _all_tensors(model):
        declared = 1
        for dim in tensor.dims:
            declared *= int(dim)
        if any(int(d) < 0 for d in tensor.dims) or declared > 2**40:
            raise LoadError(f"tensor '{tensor.name}' declares dims {list(tensor.dims)}: not a real tensor",
                            "the file is damaged or crafted; re-export the model")
        if not tensor.HasField("raw_data") or tensor.data_type in _PACKED_TYPES:
            continue  # typed fields (float_data...) are checked by numpy_helper, packed types pack elements
        try:
            itemsize = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
        except (KeyError, TypeError, ValueError):
            continue  # strings and unknown types: nothing bnfold folds
        if len(tensor.raw_data) != declared * itemsize:
            raise LoadError(f"tensor '{tensor.name}' declares {declared:,} elements ({list(tensor.dims)}) but holds "
                            f"{len(tensor.raw_data):,} bytes", "the file is damaged or crafted; re-export the model")


#: 4-bit and 2-bit types pack several elements a byte: their raw size is not dims x itemsize.
_PACKED_TYPES = {getattr(TensorProto, n) for n in ("INT4", "UINT4", "FLOAT4E2M1", "INT2", "UINT2")
                 if hasattr(TensorProto, n)}


# -- writing -------------------------------------------------------------------------------------------------
def _data_bytes(tensor: TensorProto) -> bytes:
    """The tensor's data in raw (little-endian) form, as an external data file holds it."""
    if tensor.HasField("raw_data"):
        return tensor.raw_data
    return numpy_helper.to_array(tensor).tobytes()


def _data_size(tensor: TensorProto) -> int:
    if tensor.HasField("raw_data"):
        return len(tensor.raw_data)
    return _expected_bytes(tensor) or 0


_DATA_FIELDS = ("raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data")


def _layout_data(tensors: list[TensorProto]) -> dict[int, int]:
    """Which of ``tensors`` go to the data file (their positions in the list), each with its offset there."""
    placed, end = {}, 0
    for position, tensor in enumerate(tensors):
        size = _data_size(tensor)
        if tensor.data_type == TensorProto.STRING or size < INLINE_BELOW:
            continue
        if size >= ALIGN_FROM:
            end = -(-end // ALIGNMENT) * ALIGNMENT
        placed[position] = end
        end += size
    return placed


def _write_all(file, data: bytes | memoryview) -> None:
    # Unbuffered writes, a short one retried: a full disk raises OSError instead of losing bytes.
    view = memoryview(data)
    while view:
        view = view[file.write(view):]


def _write_data(path: str, tensors: list[TensorProto], placed: dict[int, int]) -> None:
    with open(path, "wb", buffering=0) as file:
        for position, offset in placed.items():
            _write_all(file, b"\0" * (offset - file.tell()))
            _write_all(file, _data_bytes(tensors[position]))


def _skeleton(model: onnx.ModelProto, placed: dict[int, int], location: str) -> bytes:
    """``model`` serialised with the placed tensors pointing into the data file, their data left out (a copy:
    the caller's model is not touched)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    tensors = _all_tensors(copy)
    for position, offset in placed.items():
        tensor = tensors[position]
        size = _data_size(tensor)
        for name in _DATA_FIELDS:
            tensor.ClearField(name)
        tensor.data_location = TensorProto.EXTERNAL
        for key, value in (("location", location), ("offset", str(offset)), ("length", str(size))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
    return copy.SerializeToString()


def _inline_bytes(model: onnx.ModelProto, limit: int) -> bytes | None:
    """``model`` serialised, or None when it is larger than ``limit`` bytes (its tensors alone are counted first,
    so a model over protobuf's limit is never handed to the serialiser)."""
    if sum(_data_size(t) for t in _all_tensors(model)) > min(limit, PROTOBUF_LIMIT):
        return None
    data = model.SerializeToString()
    return data if len(data) <= limit else None


def _write_model_and_data(model: onnx.ModelProto, path: Path, data_path: Path) -> None:
    """Both files through temporary files; the data file replaces its target first, then the model."""
    tensors = _all_tensors(model)
    placed = _layout_data(tensors)
    skeleton = _skeleton(model, placed, data_path.name)
    target = path
    try:
        with atomic_path(path) as model_tmp:
            target = data_path
            with atomic_path(data_path) as data_tmp:
                _write_data(str(data_tmp), tensors, placed)
                target = path
                with open(model_tmp, "wb", buffering=0) as file:
                    _write_all(file, skeleton)
    except OSError as exc:
        raise output_error(target, exc) from None


def save_onnx(model: onnx.ModelProto, path: Path | str, *, external_data: bool | None = None,
              size_threshold: int = PROTOBUF_LIMIT, source: Path | str | None = None) -> list[Path]:
    """Write ``model`` to ``path`` atomically; returns the files written (the model first, then its data file).

    Tensors of 1 KiB or more go to ``<name>.data`` beside ``path`` when ``external_data`` is True, when ``source``
    (the file the model was loaded from) kept tensors in external files, or when the serialised model would be
    larger than ``size_threshold`` bytes (protobuf's 2 GB limit; tests lower it). False and None both mean
    "only when needed": a model too large for one protobuf cannot be written inline. The model is not changed.
    """
    path = Path(path)
    if any(_is_external(t) for t in _all_tensors(model)):
        raise ValueError("the model still refers to external data: load it with load_onnx() first")
    external = bool(external_data) or (source is not None and has_external_data(source))
    inline = None if external else _inline_bytes(model, size_threshold)
    if inline is not None:
        write_bytes_atomic(path, inline)
        return [path]
    data_path = path.with_name(f"{path.name}.data")
    _write_model_and_data(model, path, data_path)
    return [path, data_path]
