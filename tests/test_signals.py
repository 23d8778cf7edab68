"""Ctrl-C and SIGTERM: bnfold exits 130 / 143 without a traceback and leaves nothing behind: no onnxruntime
worker (its own, or a ``verify -j`` worker's), no ``bnfold-*`` temp folder, no output and no temporary file."""

from __future__ import annotations

import os
import signal
import threading
import time

import onnx.parser
import pytest

from bnfold.onnx.runner import OrtWorker, run_onnxruntime
from tests.conftest import OLD, temp_files
from tests.onnx_graphs import LOOP, LOOP_BN, ONE, graph, save
from tests.processes import (
    POSIX,
    bnfold_child,
    cmdline,
    descendants,
    gone,
    kill_leftovers,
    run_child,
    still_running,
    wait_for_ort_worker,
)

RELU = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N,2] x) => (float[N,2] y) {
    y = Relu (x)
}"""


# -- the command line, in a child process --------------------------------------------------------------------------
@POSIX
def test_ctrl_c_while_bnfold_starts_prints_no_traceback(tmp_path):
    """Attack: Ctrl-C in the first second (while bnfold imports torch), e.g. a user who typed the wrong file.
    Expected: exit 130 (or killed by SIGINT) and no traceback. Today a KeyboardInterrupt traceback through
    importlib is printed: the SIGINT handling in bnfold/cli._exit_through starts only after every import (the
    console script imports bnfold.cli, which imports torch, at module level)."""
    model = save(graph(), tmp_path / "m.onnx")
    child = bnfold_child("fuse", str(model), "-o", str(tmp_path / "out.onnx"), cwd=tmp_path)
    time.sleep(0.7)
    child.send_signal(signal.SIGINT)
    _, err = child.communicate(timeout=60)
    assert child.returncode in (130, -signal.SIGINT), (child.returncode, err[-2000:])
    assert "Traceback" not in err, err[-2000:]


@POSIX
def test_sigterm_during_fuse_onnx_leaves_no_worker_temp_folder_or_output(tmp_path):
    """Attack: SIGTERM while onnxruntime runs the original graph of ``bnfold fuse model.onnx`` (a Loop that runs
    for days). Expected: exit 143, the onnxruntime child gone, no ``bnfold-*`` folder, no output, no temp file."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    path = save(graph(LOOP_BN), tmp_path / "loop.onnx")
    child = bnfold_child("fuse", str(path), "-o", str(tmp_path / "out.onnx"), "--timeout", "120", cwd=tmp_path,
                         tmpdir=tmp)
    seen: list[int] = []
    try:
        seen = wait_for_ort_worker(child)
        time.sleep(1.5)
        child.send_signal(signal.SIGTERM)
        _, err = child.communicate(timeout=60)
        assert child.returncode == 143, err[-2000:]
        assert "Traceback" not in err
        assert not still_running(seen)
        assert not list(tmp.glob("bnfold-*"))
        assert sorted(p.name for p in tmp_path.iterdir()) == ["loop.onnx", "tmp"]
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        kill_leftovers(seen)


@POSIX
@pytest.mark.parametrize("signum", [signal.SIGTERM], ids=lambda s: s.name)
def test_interrupted_parallel_verify_leaves_no_onnxruntime_worker_and_no_temp_folder(tmp_path, signum):
    """Attack: ``bnfold verify -j 2`` over a config whose first model is an ONNX graph that loops for days,
    SIGTERM while onnxruntime runs it. Expected: exit 143, no process left behind (the onnxruntime child of the
    worker included), no ``bnfold-*`` folder in $TMPDIR. Today bnfold/parallel.py SIGKILLs its worker
    processes, so their own onnxruntime child is orphaned and spins at 100% CPU until the Loop ends (days), and
    the worker's temp folder stays."""
    project, tmp = tmp_path / "project", tmp_path / "tmp"
    project.mkdir()
    tmp.mkdir()
    save(graph(LOOP_BN), project / "loop.onnx")
    save(onnx.parser.parse_model(RELU), project / "relu.onnx")
    (project / "pyproject.toml").write_text('[[tool.bnfold.models]]\nname = "loop"\npath = "loop.onnx"\n\n'
                                            '[[tool.bnfold.models]]\nname = "relu"\npath = "relu.onnx"\n')
    child = bnfold_child("verify", "-j", "2", "--timeout", "120", cwd=project, tmpdir=tmp)
    seen: list[int] = []
    try:
        seen = wait_for_ort_worker(child)
        time.sleep(3)  # the loop's request is in flight
        seen = sorted(set(seen) | set(descendants(child.pid)))
        child.send_signal(signum)
        _, err = child.communicate(timeout=60)
        assert child.returncode == 128 + signum, err[-2000:]
        left = still_running([pid for pid in seen if "resource_tracker" not in cmdline(pid)])
        assert not left, f"left running after {signum.name}: {left}"
        assert not list(tmp.glob("bnfold-*")), sorted(p.name for p in tmp.iterdir())
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        kill_leftovers(seen)


# -- onnxruntime's worker ------------------------------------------------------------------------------------------
@POSIX
def test_interrupt_mid_request_kills_the_worker(tmp_path):
    """Ctrl-C while onnxruntime works: KeyboardInterrupt reaches the caller and the child is gone, without
    waiting for close()."""
    worker = OrtWorker(timeout=60)
    path = save(LOOP, tmp_path / "loop.onnx")
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    timer = threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGINT))
    try:
        timer.start()
        start = time.monotonic()
        with pytest.raises(KeyboardInterrupt):
            run_onnxruntime(path, ONE, tmp_path, worker)
    finally:
        timer.cancel()
        signal.signal(signal.SIGINT, previous)
    assert time.monotonic() - start < 10
    assert gone(worker.proc.pid)


# -- a write in progress -------------------------------------------------------------------------------------------
#: The child writes OLD, then starts replacing it and sends itself ``signum`` half-way through the write. With
#: ``via=cli`` the write runs the way every bnfold command runs (its signal handling and exit codes); with
#: ``via=plain``, under a bare handler that raises SystemExit, as any caller's handler that unwinds would.
SIGNAL_DURING_WRITE = """
    import os, signal, sys
    from pathlib import Path
    from bnfold.save import write_atomic
    target, signum, via = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    target.write_bytes({old!r})

    def signalled(tmp):
        Path(tmp).write_bytes(b"half a model")
        os.kill(os.getpid(), signum)
        Path(tmp).write_bytes(b"the handler did not stop the write")

    def command():
        write_atomic(target, signalled)
        return 0

    if via == "cli":
        import bnfold.cli
        bnfold.cli._exit_through(command, debug=False)
    else:
        def exit_on_signal(signum, frame):
            raise SystemExit(128 + signum)
        signal.signal(signum, exit_on_signal)
        command()
    """.format(old=OLD)


def assert_signal_left_nothing(tmp_path, signum: int, via: str) -> None:
    folder, tmpdir = tmp_path / "out", tmp_path / "tmpdir"
    folder.mkdir()
    tmpdir.mkdir()
    target = folder / "model.pt2"
    child = run_child(SIGNAL_DURING_WRITE, str(target), str(int(signum)), via, tmpdir=tmpdir)
    assert child.returncode == 128 + signum, (child.returncode, child.stderr[-3000:])
    assert "Traceback" not in child.stderr
    assert target.read_bytes() == OLD
    assert temp_files(folder) == []
    assert list(tmpdir.glob("bnfold-*")) == []


def test_exit_from_a_signal_handler_leaves_no_temp_file(tmp_path):
    assert_signal_left_nothing(tmp_path, signal.SIGTERM, "plain")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=lambda s: s.name)
def test_cli_signal_handling_during_a_write(tmp_path, signum):
    assert_signal_left_nothing(tmp_path, signum, "cli")
