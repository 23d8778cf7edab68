"""Shared fixtures. The repository root is importable so tests (and --arch) can use ``models``."""

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

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


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
