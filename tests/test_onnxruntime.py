"""Running graphs in onnxruntime (bnfold.onnx.runner): a child process under a timeout; a hang, a load failure, a
run failure and a crash each end in their own one-line message and hint, and the child never outlives its use."""

from __future__ import annotations

import time

import pytest
import torch

from bnfold.errors import BnfoldError
from bnfold.findings import CODES
from bnfold.onnx.check import check_onnx
from bnfold.onnx.runner import DEFAULT_ORT_TIMEOUT_S, OrtWorker, run_onnxruntime
from tests.cli_helpers import assert_clean_error, cli
from tests.onnx_graphs import LOOP, LOOP_BN, ONE, graph, save
from tests.processes import POSIX, gone

UNKNOWN_OP = """
<ir_version: 8, opset_import: ["" : 15, "com.example" : 1]>
g (float[1] x) => (float[1] y) {
    y = com.example.Frobnicate (x)
}
"""


RELU = """
<ir_version: 8, opset_import: ["" : 15]>
g (float[1] x) => (float[1] y) {
    y = Relu (x)
}
"""


@pytest.fixture
def fake_worker(tmp_path, monkeypatch):
    """Replace onnxruntime's child by a script that says ready, reads one request, then runs ``after``."""

    def install(after: str) -> None:
        script = tmp_path / "fake_worker.py"
        script.write_text("import os, signal, sys, time\nprint('ready', flush=True)\nsys.stdin.readline()\n" + after)
        monkeypatch.setattr("bnfold.onnx.runner._WORKER", script)

    return install


# -- timeouts ------------------------------------------------------------------------------------------------------
@POSIX
def test_timeout_stops_a_graph_that_loops_for_days(tmp_path):
    with OrtWorker(timeout=2) as worker:
        start = time.monotonic()
        run = run_onnxruntime(save(LOOP, tmp_path / "loop.onnx"), ONE, tmp_path, worker)
        elapsed = time.monotonic() - start
        pid = worker.proc.pid
        assert gone(pid)  # killed and reaped at once, not when the worker is closed
    assert elapsed < 10
    assert run.failure.kind == "timeout"
    assert run.error == "onnxruntime did not finish within 2 s and was stopped (--timeout)"


def test_check_onnx_timeout_is_a_bn010_finding_with_a_hint(tmp_path):
    path = save(LOOP, tmp_path / "loop.onnx")
    result = check_onnx(None, {"batch 1": (ONE["case"], torch.ones(1))}, onnx_path=path, exporter="torchscript",
                        atol=None, rtol=None, workdir=tmp_path, timeout=2)
    finding = next(f for f in result.findings if f.code == "BN010")
    assert "did not finish within 2 s" in finding.message
    assert "--timeout" in finding.hint and finding.hint != CODES["BN010"].hint
    assert result.parity == []


def test_a_worker_that_timed_out_starts_afresh_for_the_next_request(tmp_path):
    with OrtWorker(timeout=2) as worker:
        assert run_onnxruntime(save(LOOP, tmp_path / "loop.onnx"), ONE, tmp_path, worker).failure.kind == "timeout"
        run = run_onnxruntime(save(RELU, tmp_path / "relu.onnx"), ONE, tmp_path, worker, timeout=60)
    assert run.failure is None and run.outputs["case"][0][0].tolist() == [1.0]


@pytest.mark.parametrize("seconds", [0, -1, float("nan"), float("inf"), "5"])
def test_timeout_must_be_a_positive_number(seconds):
    with pytest.raises(BnfoldError, match="positive number of seconds"):
        OrtWorker(timeout=seconds)


def test_default_timeout_is_documented_and_generous():
    assert 60 <= DEFAULT_ORT_TIMEOUT_S <= 600


def test_graph_that_loops_for_days_is_stopped_by_the_fuse_timeout(tmp_path):
    """Attack: ``bnfold fuse loop.onnx`` where a Loop runs 10**12 trips. Expected: bounded by --timeout (default
    300 s): exit 2 naming the limit, nothing written."""
    path = save(graph(LOOP_BN), tmp_path / "loop.onnx")
    start = time.monotonic()
    result = cli("fuse", str(path), "-o", str(tmp_path / "out.onnx"), "--timeout", "2")
    assert time.monotonic() - start < 60
    assert_clean_error(result)
    assert "did not finish within 2 s" in result.output
    assert not (tmp_path / "out.onnx").exists()


# -- closing the worker --------------------------------------------------------------------------------------------
@POSIX
def test_close_never_waits_on_a_child_that_ignores_end_of_input(tmp_path, fake_worker):
    fake_worker("signal.signal(signal.SIGTERM, signal.SIG_IGN)\nprint('ok', flush=True)\ntime.sleep(3600)\n")
    worker = OrtWorker(timeout=30)
    assert worker.request(tmp_path / "m.onnx", tmp_path / "i.npz", tmp_path / "o.npz") is None
    start = time.monotonic()
    worker.close()
    worker.close()  # twice is harmless
    assert time.monotonic() - start < 3
    assert gone(worker.proc.pid)


# -- load, run and crash failures each get their own message and hint ----------------------------------------------
def test_load_failure_keeps_the_whole_reason_and_says_nothing_was_compared(tmp_path):
    path = save(UNKNOWN_OP, tmp_path / ("long-name-" * 25 + ".onnx"))  # pushes the reason past 300 characters
    result = check_onnx(None, {"batch 1": (ONE["case"], torch.ones(1))}, onnx_path=path, exporter="torchscript",
                        atol=None, rtol=None, workdir=tmp_path)
    finding = next(f for f in result.findings if f.code == "BN010")
    assert finding.message.startswith("onnxruntime could not load the graph: ")
    assert "Frobnicate(-1) is not a registered function/op" in finding.message
    assert "could not load" in finding.hint and "compared nothing" in finding.hint
    assert "\n" not in finding.message


def test_run_failure_is_told_apart_from_a_load_failure(tmp_path):
    run = run_onnxruntime(save(RELU, tmp_path / "relu.onnx"), {"case": (torch.ones(4, 5),)}, tmp_path)
    assert run.failure.kind == "run"
    assert run.error.startswith("onnxruntime failed running the graph: ") and "Invalid rank" in run.error
    assert "--input-shape" in run.failure.finding().hint


@POSIX
def test_crash_is_its_own_kind(tmp_path, fake_worker):
    fake_worker("sys.stderr.write('about to fall over\\n'); sys.stderr.flush()\nos.kill(os.getpid(), signal.SIGSEGV)\n")
    run = run_onnxruntime(save(RELU, tmp_path / "relu.onnx"), ONE, tmp_path)
    assert run.failure.kind == "crash"
    assert run.error == "onnxruntime was killed by signal 11: about to fall over"
