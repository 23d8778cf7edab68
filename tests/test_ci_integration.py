"""Where CI users look: ``python -m bnfold``, the pre-commit hook, the GitHub Action, ``py.typed``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml  # the test extra installs pyyaml
from conftest import ROOT


def test_python_dash_m_is_the_command_line():
    done = subprocess.run([sys.executable, "-m", "bnfold", "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "Usage: bnfold" in done.stdout
    for command in ("fuse", "verify", "export", "inspect", "recalibrate"):
        assert command in done.stdout


def test_pre_commit_hook_runs_verify_on_the_config():
    hooks = yaml.safe_load((ROOT / ".pre-commit-hooks.yaml").read_text())
    hook = next(h for h in hooks if h["id"] == "bnfold-verify")
    assert hook["entry"].split()[:2] == ["bnfold", "verify"] and hook["pass_filenames"] is False
    assert hook["language"] == "python"


def test_action_passes_inputs_through_the_environment():
    action = yaml.safe_load((ROOT / "action.yml").read_text())
    assert {"config", "junit", "jobs", "trust", "extra-args"} <= set(action["inputs"])
    steps = action["runs"]["steps"]
    scripts = [s["run"] for s in steps if "run" in s]
    assert scripts and all("${{" not in script for script in scripts)  # no input pasted into a shell script
    verify = next(s["run"] for s in steps if "run" in s and "bnfold" in s["run"])
    assert "--format github" in verify and "--junit" in verify
    assert any(s.get("uses", "").startswith("actions/upload-artifact") for s in steps)


def test_package_is_typed():
    import bnfold

    assert (Path(bnfold.__file__).parent / "py.typed").exists()
