"""Shared fixtures and file helpers. The repository root is importable so tests (and --arch) can use ``models``
and ``tests``."""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from models import zoo  # noqa: E402
from tests.nets import X, net  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

#: What a file held before bnfold was asked to replace it.
OLD = b"the previous version of the file\n"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def temp_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob(".*.tmp*"))


@pytest.fixture
def in_root(monkeypatch):
    """Run in the repository root, as a user running bnfold beside their model package would."""
    monkeypatch.chdir(ROOT)
    return ROOT


@pytest.fixture(scope="session")
def digits_model():
    return zoo.build("resnet_digits")


@pytest.fixture(scope="session")
def digits_input():
    return (torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0)),)


@pytest.fixture(scope="session")
def program(tmp_path_factory):
    """A torch.export program of :func:`tests.nets.net` (``.pt2``), written once."""
    path = tmp_path_factory.mktemp("program") / "good.pt2"
    torch.export.save(torch.export.export(net(), X), str(path))
    return path


@pytest.fixture
def state_dict_file(tmp_path, digits_model):
    path = tmp_path / "sd.pt"
    torch.save(digits_model.state_dict(), path)
    return path
