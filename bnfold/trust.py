"""The trust gate: what in a model file would run code, checked *before* anything from the file runs.

Running a model runs its program, so "load this file" can mean "run this file's code". bnfold refuses,
unless the user passed ``--trust`` (``trust=True``), anything that would execute code or touch files:

1. **Whole pickles** (``torch.save(model)``): unpickling calls whatever the file names (see ``load.py``).
2. **torch.export archives (``.pt2``)** are data plus a graph of operators, but ``torch.export.load`` unpickles
   weights and constants flagged ``"use_pickle": true``, custom/opaque object constants, and falls back to
   ``weights_only=False`` for embedded ``torch.save`` blobs (sample inputs, legacy weights) that the safe
   loader refuses. :func:`check_pt2_archive` reads the archive's configs and tries every embedded blob with
   ``weights_only=True`` itself, so the fallback can never be reached.
3. **TorchScript archives** hold a program. Loading one runs its ``__setstate__`` methods and running it runs
   its ``forward``; both may call any registered operator, ``torch.from_file(path, shared=True)`` (writes a
   file) or ``aten::save`` included. Decision: TorchScript is not gated as a whole (it is the most common
   deployment format and core operators are pure tensor math); instead its source is scanned before loading
   and every method's graph after loading, and an operator outside the core namespaces or one that takes a
   file name is refused (:func:`check_operators`). A ``.pt2`` graph is scanned the same way.
4. **Code named by a config** (``arch``, ``data = "module:function"`` in ``[tool.bnfold]``): see ``config.py``.
   ``--arch`` and ``--data module:function`` typed on the command line are the user's own choice.

Zip archives are also checked for declared sizes before anything is read (:func:`check_zip_sizes`): a
600 KB file must not be able to make bnfold allocate gigabytes.
"""

from __future__ import annotations

import functools
import io
import json
import tokenize
import zipfile
from collections import Counter
from collections.abc import Iterable
from pathlib import PurePosixPath

import torch

from bnfold.errors import LoadError, UnsafeModelError

TRUST_HINT = "if you trust the file, pass --trust (it may then run code); safetensors or a weights-only state dict " \
             "with your own --arch are pure data"

#: Operator namespaces whose operators are tensor math (no files, processes or network).
CORE_NAMESPACES = frozenset({"aten", "prim", "prims", "quantized", "_quantized", "quantization", "mkldnn",
                             "mkldnn_prepacked", "onednn", "mkl", "sparse", "rngprims", "_operator", "math",
                             "builtins"})

#: Zip limits, checked on the declared sizes before any member is read (documented in the README).
MAX_COMPRESSION_RATIO = 100
RATIO_CHECK_MIN_BYTES = 1 << 20  # small members compress well legitimately (JSON, zeros)
MAX_TOTAL_BYTES = 64 << 30


def check_zip_sizes(path: str, archive: zipfile.ZipFile) -> None:
    """Refuse a zip whose members declare a total or a compression ratio beyond the documented limits, or whose
    member names are ambiguous (duplicates: Python and torch may read different copies) or escape the archive."""
    names = [info.filename for info in archive.infolist()]
    duplicates = sorted(n for n, count in Counter(names).items() if count > 1)
    if duplicates:
        raise LoadError(f"{path}: member {duplicates[0]!r} appears more than once: readers disagree on which copy "
                        "counts", "re-save the model with torch.save / torch.export.save")
    escaping = next((n for n in names if n.startswith(("/", "\\")) or ".." in PurePosixPath(n).parts), None)
    if escaping is not None:
        raise LoadError(f"{path}: member {escaping!r} points outside the archive", "re-save the model")
    total = 0
    for info in archive.infolist():
        total += info.file_size
        ratio = info.file_size / max(info.compress_size, 1)
        if info.file_size > RATIO_CHECK_MIN_BYTES and ratio > MAX_COMPRESSION_RATIO:
            raise LoadError(f"{path}: member {info.filename!r} declares {info.file_size:,} bytes compressed "
                            f"{ratio:,.0f}:1 (limit {MAX_COMPRESSION_RATIO}:1): refusing a possible zip bomb",
                            "torch writes its archives uncompressed; re-save the model with torch.save / "
                            "torch.export.save")
    if total > MAX_TOTAL_BYTES:
        raise LoadError(f"{path}: members declare {total:,} bytes in all (limit {MAX_TOTAL_BYTES:,})",
                        "bnfold refuses archives larger than 64 GiB")


# -- torch.export archives --------------------------------------------------------------------------------
_PICKLED_CONSTANT_PREFIXES = ("custom_obj", "opaque_obj")


def check_pt2_archive(path: str, archive: zipfile.ZipFile) -> None:
    """Raise :class:`UnsafeModelError` when ``torch.export.load`` would unpickle anything from the archive or
    hand it to AOTInductor (which compiles and loads native code, running a command read from the archive)."""
    reasons: list[str] = []
    for name in archive.namelist():
        member = PurePosixPath(name)
        if "aotinductor" in member.parts:
            reasons.append(f"{name} is AOTInductor code (torch.export.load would compile and load it)")
        elif member.suffix == ".json" and member.parent.name in ("weights", "constants"):
            reasons += _config_reasons(name, archive.read(name))
        elif member.suffix == ".pt" and not _loads_weights_only(path, name, archive.read(name)):
            reasons.append(f"{name} is a pickle that the safe loader refuses (torch.export.load would unpickle it)")
    if reasons:
        raise UnsafeModelError(f"{path}: refusing to load it: {reasons[0]}"
                               + (f" (and {len(reasons) - 1} more)" if len(reasons) > 1 else ""), TRUST_HINT)


def _config_reasons(name: str, raw: bytes) -> list[str]:
    try:
        entries = json.loads(raw).get("config", {})
    except (ValueError, AttributeError):
        return [f"{name} is not a valid payload config"]
    if not isinstance(entries, dict):
        return [f"{name} is not a valid payload config"]
    reasons = []
    for fqn, meta in entries.items():
        if not isinstance(meta, dict):
            reasons.append(f"{name}: entry {fqn!r} is not an object")
        elif meta.get("use_pickle"):
            reasons.append(f"{fqn!r} is stored as a pickle (use_pickle in {name})")
        elif str(meta.get("path_name", "")).startswith(_PICKLED_CONSTANT_PREFIXES):
            reasons.append(f"{fqn!r} is a pickled custom object ({meta.get('path_name')})")
    return reasons


def _loads_weights_only(path: str, name: str, blob: bytes) -> bool:
    if not blob:
        return True  # torch reads an empty blob as {}
    if blob.startswith(b"PK\x03\x04"):  # a torch.save zip inside the archive: its sizes are checked first too
        try:
            with zipfile.ZipFile(io.BytesIO(blob)) as inner:
                check_zip_sizes(f"{path} (member {name})", inner)
        except zipfile.BadZipFile:
            return False
    try:
        torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
        return True
    except Exception:  # noqa: BLE001 - any refusal means torch would fall back to a full unpickle
        return False


# -- operators (TorchScript and exported graphs) ----------------------------------------------------------
@functools.lru_cache(maxsize=1)
def _file_operators() -> frozenset[str]:
    """Every registered operator with an argument naming a file (``aten::from_file``, ``aten::save``)."""
    names = set()
    for schema in torch._C._jit_get_all_schemas():
        if any(arg.name in ("filename", "file", "path") and str(arg.type) == "str" for arg in schema.arguments):
            names.add(schema.name)
    return frozenset(names)


def unsafe_operators(kinds: Iterable[str]) -> list[str]:
    """The operators among ``kinds`` (``aten::add``, ``prim::Constant``...) that touch files or leave core math."""
    bad = []
    for kind in sorted(set(kinds)):
        namespace = kind.split("::", 1)[0] if "::" in kind else kind.split(".", 1)[0]
        if kind in _file_operators() or namespace not in CORE_NAMESPACES:
            bad.append(kind)
    return bad


def check_operators(path: str, kinds: Iterable[str], what: str) -> None:
    bad = unsafe_operators(kinds)
    if bad:
        raise UnsafeModelError(f"{path}: refusing to run it: its {what} calls {', '.join(bad[:4])}"
                               + (f" and {len(bad) - 4} more" if len(bad) > 4 else "")
                               + " (file, process or non-core operators)", TRUST_HINT)


_FILE_NAMES = frozenset({"from_file", "save"})


def check_torchscript_source(path: str, archive: zipfile.ZipFile) -> None:
    """Scan the archive's serialized code before ``torch.jit.load`` compiles it and runs its ``__setstate__``.

    The code is tokenized (so spacing, parentheses and line continuations cannot hide a call): any name
    ``from_file`` or ``save``, and any ``ops.<namespace>`` outside the core namespaces, is refused.
    """
    for name in archive.namelist():
        if "/code/" not in name or not name.endswith(".py"):
            continue
        found = _unsafe_source_name(archive.read(name).decode("utf-8", "replace"))
        if found:
            raise UnsafeModelError(f"{path}: refusing to load it: {name} calls {found} (file, process or non-core "
                                   "operators)", TRUST_HINT)


def _unsafe_source_name(text: str) -> str | None:
    try:
        tokens = [t for t in tokenize.generate_tokens(io.StringIO(text).readline)
                  if t.type in (tokenize.NAME, tokenize.OP)]
    except (tokenize.TokenError, IndentationError, SyntaxError):
        return "code that does not tokenize"
    for i, token in enumerate(tokens):
        if token.type != tokenize.NAME:
            continue
        if token.string in _FILE_NAMES:
            return token.string
        if (token.string == "ops" and i + 2 < len(tokens) and tokens[i + 1].string == "."
                and tokens[i + 2].string not in CORE_NAMESPACES):
            return f"ops.{tokens[i + 2].string}"
    return None


def script_operators(module: torch.jit.ScriptModule) -> set[str]:
    """Operator kinds of every method of every submodule, called functions inlined."""
    kinds: set[str] = set()
    for sub in module.modules():
        for method_name in _method_names(sub):
            graph = getattr(sub, method_name).graph.copy()
            torch._C._jit_pass_inline(graph)
            kinds.update(_graph_kinds(graph.nodes()))
    return kinds


def _method_names(module: torch.jit.ScriptModule) -> list[str]:
    try:
        return [m.name for m in module._c._get_methods()]
    except AttributeError:  # pragma: no cover - older torch
        return ["forward"]


def _graph_kinds(nodes: Iterable[torch._C.Node]) -> set[str]:
    kinds = set()
    for node in nodes:
        kinds.add(node.kind())
        for block in node.blocks():
            kinds.update(_graph_kinds(block.nodes()))
    return kinds


#: Control-flow operators of exported graphs: their bodies are subgraphs, scanned like the main graph.
_HIGHER_ORDER = frozenset({"cond", "while_loop", "map_impl", "wrap_with_set_grad_enabled", "wrap_with_autocast"})


def program_operators(program: torch.export.ExportedProgram) -> set[str]:
    """Operator names in an exported program's graphs (``aten::convolution``...); other callables by name."""
    kinds = set()
    for graph_module in program.graph_module.modules():
        if not isinstance(graph_module, torch.fx.GraphModule):
            continue
        for node in graph_module.graph.nodes:
            if node.op == "call_function":
                kinds.add(_target_name(node.target))
    return kinds


def _target_name(target: object) -> str:
    schema = getattr(target, "_schema", None)
    if schema is not None:
        return schema.name
    name = getattr(target, "__name__", repr(target))
    if isinstance(target, torch._ops.HigherOrderOperator) and name in _HIGHER_ORDER:
        return f"prim::{name}"
    return f"{getattr(target, '__module__', '?')}.{name}"
