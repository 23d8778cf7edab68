"""The package's layout as API: every module imports on its own (no import circle held together by import
order), no module imports another inside a function to dodge a circle, and the model kind is decided in
``bnfold/kinds/`` only."""

from __future__ import annotations

import ast
import importlib
import pkgutil
import sys
from pathlib import Path

import pytest

import bnfold
from bnfold.discover.reasons import CODES

PACKAGE = Path(bnfold.__file__).parent
#: Imports inside functions that are there on purpose, not to dodge a circle: ``import bnfold`` stays light
#: (public names load on first use), and the console script imports the CLI while it holds the signals.
DELIBERATE = {"bnfold/__init__.py", "bnfold/_entry.py"}


def modules() -> list[str]:
    return sorted(m.name for m in pkgutil.walk_packages([str(PACKAGE)], prefix="bnfold."))


@pytest.mark.parametrize("name", modules())
def test_every_module_imports_first(name):
    """Imported before any other bnfold module, each module still loads: no circle depends on who goes first."""
    saved = {k: v for k, v in sys.modules.items() if k == "bnfold" or k.startswith("bnfold.")}
    for key in saved:
        del sys.modules[key]
    try:
        importlib.import_module(name)
    finally:
        for key in [k for k in sys.modules if k == "bnfold" or k.startswith("bnfold.")]:
            del sys.modules[key]
        sys.modules.update(saved)


def _function_imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = []
    for func in ast.walk(tree):
        if isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node in ast.walk(func):
                if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("bnfold"):
                    found.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} from {node.module}")
                elif isinstance(node, ast.Import) and any(a.name.startswith("bnfold") for a in node.names):
                    found.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} import bnfold")
    return found


def test_no_bnfold_import_inside_a_function():
    found = [hit for path in sorted(PACKAGE.rglob("*.py"))
             if str(path.relative_to(PACKAGE.parent)) not in DELIBERATE for hit in _function_imports(path)]
    assert found == []


def test_the_model_kind_is_tested_in_kinds_only():
    """``adapter.kind == ...`` (or ``!=``) outside ``bnfold/kinds/``: a decision that belongs to the kind's
    adapter (a capability such as ``has_modes``, ``eager``, ``runs_in_onnxruntime``, or a method)."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if "kinds" in path.relative_to(PACKAGE).parts:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (isinstance(node, ast.Compare) and isinstance(node.left, ast.Attribute) and node.left.attr == "kind"
                    and isinstance(node.left.value, ast.Name) and node.left.value.id == "adapter"):
                found.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}")
    assert found == []


def _layout_table() -> list[list[str]]:
    """The backticked paths of each row of the README's Layout table (first column), as repository paths."""
    text = (PACKAGE.parent / "README.md").read_text(encoding="utf-8")
    section = text.split("\n## Layout\n", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        if not line.startswith("| `"):
            continue
        cells = line.split("|")
        tokens = [t for t in cells[1].split("`")[1::2]]
        base = tokens[0].rstrip("/").rpartition("/")[0] if not tokens[0].endswith("/") else tokens[0].rstrip("/")
        paths = [tokens[0].rstrip("/")] + [f"{base}/{t}" if "/" not in t else t for t in tokens[1:]]
        # modules named in the second column (``graph.py``, ``plot.py``) sit beside the row's first path
        paths += [f"{base}/{t}" for t in cells[2].split("`")[1::2] if t.endswith(".py") and "/" not in t]
        rows.append(paths)
    return rows


def test_the_readme_layout_table_matches_the_tree():
    """Every path the table names exists, and every module of the package is named (itself, or its folder)."""
    root = PACKAGE.parent
    named = {p for row in _layout_table() for p in row}
    assert sorted(p for p in named if not (root / p).exists()) == []
    modules = {str(p.relative_to(root)) for p in PACKAGE.rglob("*.py")
               if p.name not in ("__init__.py", "__main__.py") or p.parent == PACKAGE}
    folders_with_files = {p for p in named if (root / p).is_dir()}
    missing = sorted(m for m in modules if m not in named and m.rpartition("/")[0] not in folders_with_files)
    assert missing == []
    listed = sorted(m for m in modules if m.rpartition("/")[0] in folders_with_files and m not in named)
    assert listed == [], "a folder's row names each of its modules"


def test_the_readme_lists_every_reason_code():
    """The reason codes are API: the README's table lists exactly the registry, in its order."""
    text = (PACKAGE.parent / "README.md").read_text(encoding="utf-8")
    section = text.split("\n### Reason codes (API)\n", 1)[1].split("\n## ", 1)[0]
    listed = [line.split("`")[1] for line in section.splitlines() if line.startswith("| `")]
    assert listed == list(CODES)
