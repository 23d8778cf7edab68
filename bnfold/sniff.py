"""What format a file holds, from its first bytes (and a zip's member names): never from its extension."""

from __future__ import annotations

import struct
import zipfile
from pathlib import Path


def sniff(path: Path) -> str:
    """``"zip:torchscript"``, ``"zip:export"``, ``"zip:torch"``, ``"zip:damaged"``, ``"safetensors"``, ``"pickle"``
    or ``"unknown"``."""
    with open(path, "rb") as f:
        head = f.read(16)
    if head.startswith(b"PK\x03\x04"):
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        except (zipfile.BadZipFile, OSError, ValueError):
            return "zip:damaged"
        if any("/code/" in n for n in names) and any(n.endswith("constants.pkl") for n in names):
            return "zip:torchscript"
        if any(n.endswith("archive_format") or "/models/" in n and n.endswith(".json") for n in names):
            return "zip:export"
        if any(n.endswith("data.pkl") for n in names):
            return "zip:torch"
        return "unknown"
    if len(head) >= 9:
        (header_len,) = struct.unpack("<Q", head[:8])
        if 0 < header_len < 100_000_000 and head[8:9] == b"{":
            return "safetensors"
    if head[:1] == b"\x80":  # pickle protocol 2+ (the legacy torch.save format starts with one)
        return "pickle"
    if head[:1] == b"\x08":  # a protobuf whose first field is a varint: ModelProto's ir_version (parsed to be sure)
        return "onnx"
    return "unknown"
