"""Child processes for the tests that need a real one (signals, resource limits, onnxruntime's worker): running
bnfold or a script in a child, and finding, watching and killing the processes below it (from /proc)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT

POSIX = pytest.mark.skipif(sys.platform == "win32",
                           reason="FIFOs, signals, rlimits and zombie processes are POSIX notions")


def bnfold_child(*args: str, cwd: Path, tmpdir: Path | None = None, address_space: int | None = None
                 ) -> subprocess.Popen:
    """``python -m bnfold ARGS`` in a child process (own TMPDIR; optionally a cap on its address space, set by
    the child itself before bnfold is imported, and inherited by its own children)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    if tmpdir is not None:
        env["TMPDIR"] = str(tmpdir)
    start = ["-m", "bnfold"]
    if address_space:
        limit = f"resource.setrlimit(resource.RLIMIT_AS, ({address_space}, {address_space}))"
        run = "runpy.run_module('bnfold', run_name='__main__')"
        start = ["-c", f"import resource, runpy, sys; {limit}; sys.argv[0] = 'bnfold'; {run}"]
    return subprocess.Popen([sys.executable, *start, *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (children, grandchildren...), from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, stack = [], [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def running(pid: int) -> bool:
    """Alive and not a zombie (an orphan reparented to a PID 1 that does not reap still counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def wait_for_ort_worker(proc: subprocess.Popen, deadline_s: float = 90) -> list[int]:
    """The pids of the ort_worker processes below ``proc``, once there is one (within ``deadline_s``)."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end and proc.poll() is None:
        workers = [p for p in descendants(proc.pid) if "ort_worker" in cmdline(p)]
        if workers:
            return workers
        time.sleep(0.2)
    raise AssertionError(f"no onnxruntime worker appeared (exit {proc.poll()})")


def still_running(pids: list[int], within_s: float = 5.0) -> list[str]:
    """Those of ``pids`` still running after up to ``within_s`` seconds (a dying process gets time to go)."""
    end = time.monotonic() + within_s
    while True:
        left = [f"{pid}: {cmdline(pid)}" for pid in pids if running(pid)]
        if not left or time.monotonic() > end:
            return left
        time.sleep(0.2)


def kill_leftovers(pids: list[int]) -> None:
    for pid in pids:
        if running(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def gone(pid: int) -> bool:
    """True when the process no longer exists, not even as a zombie waiting to be reaped."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def run_child(script: str, *args: str, tmpdir: Path | None = None) -> subprocess.CompletedProcess:
    """Run ``python -c script args`` in the repository root (so ``models`` imports), optionally with TMPDIR."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    if tmpdir is not None:
        env["TMPDIR"] = str(tmpdir)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
