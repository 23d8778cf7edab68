"""The ONNX side under stress: onnxruntime hangs, fails to load, fails to run or crashes; the exporter fails
loudly; BN011 must only name BatchNormalizations that really fold (constant weights and statistics)."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np
import onnx
import onnx.parser
import pytest
import torch
from torch import nn

from bnfold.errors import BnfoldError
from bnfold.findings import CODES
from bnfold.onnx.check import check_onnx
from bnfold.onnx.lint import lint
from bnfold.onnx.runner import DEFAULT_ORT_TIMEOUT_S, OrtWorker, run_onnxruntime

POSIX = pytest.mark.skipif(sys.platform == "win32", reason="signals and zombie processes are POSIX notions")

# 10**12 trips of a cheap Add: runs for days unless stopped.
LOOP = """
<ir_version: 8, opset_import: ["" : 15]>
spin (float[1] x) => (float[1] y) {
    trips = Constant <value = int64 {1000000000000}> ()
    keep_going = Constant <value = bool {1}> ()
    y = Loop (trips, keep_going, x) <body = step (int64 i, bool cond, float[1] acc)
                                                => (bool cond_out, float[1] acc_out) {
        cond_out = Identity (cond)
        acc_out = Add (acc, acc)
    }>
}
"""
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
ONE = {"case": (torch.ones(1),)}


def save(text: str, path: Path) -> Path:
    onnx.save(onnx.parser.parse_model(text), str(path))
    return path


@pytest.fixture
def fake_worker(tmp_path, monkeypatch):
    """Replace onnxruntime's child by a script that says ready, reads one request, then runs ``after``."""

    def install(after: str) -> None:
        script = tmp_path / "fake_worker.py"
        script.write_text("import os, signal, sys, time\nprint('ready', flush=True)\nsys.stdin.readline()\n" + after)
        monkeypatch.setattr("bnfold.onnx.runner._WORKER", script)

    return install


def gone(pid: int) -> bool:
    """True when the process no longer exists, not even as a zombie waiting to be reaped."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


# -- 1. timeouts ---------------------------------------------------------------------------------------------
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


# -- 2. load, run and crash failures each get their own message and hint -------------------------------------
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


# -- 3. the exporter's printout never reaches the terminal ---------------------------------------------------
class Eigh(nn.Module):
    """aten::linalg_eigh has no ONNX symbolic: the TorchScript exporter fails and dumps its IR graph from C++."""

    def forward(self, x):
        return torch.linalg.eigh(x @ x.transpose(-1, -2))[0]


def test_failed_export_prints_nothing_and_reports_one_line(tmp_path, capfd, caplog):
    caplog.set_level(logging.DEBUG, logger="bnfold.onnx.export")
    x = (torch.randn(2, 3, 3),)
    result = check_onnx(Eigh().eval(), {"batch 2": (x, Eigh()(*x))}, onnx_path=None, exporter="torchscript",
                        atol=None, rtol=None, workdir=tmp_path)
    print("still here")  # file descriptors 1 and 2 are restored
    out, err = capfd.readouterr()
    assert out == "still here\n" and err == ""
    assert result.error.startswith("torchscript export failed: UnsupportedOperatorError: ")
    assert "aten::linalg_eigh" in result.error and "\n" not in result.error
    assert "Torch IR graph at exception" in caplog.text  # kept for --verbose / debugging, never printed


# -- 4. BN011 only for a BN whose weights and statistics are all constants ----------------------------------
def conv_bn(weight_as: str = "initializer", stat_as: str = "initializer") -> onnx.ModelProto:
    """x -> Conv(W, B) -> BatchNormalization(scale, bias, mean, var) -> y.

    ``weight_as`` / ``stat_as`` say where W and the BN's scale come from: an initializer (constant), a graph
    input, an initializer also listed as a graph input (a default a caller can override), or a node's output.
    """
    tensors = {"W": np.full((2, 1, 1, 1), 0.5, np.float32), "B": np.zeros(2, np.float32),
               "scale": np.ones(2, np.float32), "bias": np.zeros(2, np.float32), "mean": np.zeros(2, np.float32),
               "var": np.ones(2, np.float32)}
    nodes = [onnx.helper.make_node("Conv", ["x", "W", "B"], ["c"], name="conv"),
             onnx.helper.make_node("BatchNormalization", ["c", "scale", "bias", "mean", "var"], ["y"], name="bn")]
    inputs = [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 1, 2, 2])]
    initializers = dict(tensors)
    for name, where in (("W", weight_as), ("scale", stat_as)):
        info = onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, tensors[name].shape)
        if where == "graph input":
            del initializers[name]
            inputs.append(info)
        elif where == "overridable initializer":
            inputs.append(info)
        elif where == "node output":  # computed from a graph input too (from constants alone it would fold)
            initializers[f"{name}_source"] = initializers.pop(name)
            inputs.append(onnx.helper.make_tensor_value_info(f"{name}_delta", onnx.TensorProto.FLOAT,
                                                             tensors[name].shape))
            nodes.insert(0, onnx.helper.make_node("Add", [f"{name}_source", f"{name}_delta"], [name]))
    graph = onnx.helper.make_graph(nodes, "conv_bn", inputs,
                                   [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 2, 2, 2])],
                                   [onnx.numpy_helper.from_array(v, k) for k, v in initializers.items()])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 15)])
    onnx.checker.check_model(model)
    return model


def test_bn011_constant_weights_and_statistics_fold():
    findings = lint(conv_bn())
    assert [(f.code, f.module) for f in findings] == [("BN011", "bn")]
    assert "follows conv and could be folded" in findings[0].message


@pytest.mark.parametrize("weight_as, stat_as", [
    ("graph input", "initializer"),
    ("overridable initializer", "initializer"),
    ("node output", "initializer"),
    ("initializer", "graph input"),
    ("initializer", "overridable initializer"),
    ("initializer", "node output"),
])
def test_bn011_not_for_a_weight_or_statistic_that_can_change(weight_as, stat_as):
    assert lint(conv_bn(weight_as, stat_as)) == []


def test_bn011_not_for_a_gemm_whose_bias_is_a_graph_input():
    model = onnx.parser.parse_model("""
    <ir_version: 8, opset_import: ["" : 15]>
    g (float[1, 2] x, float[2] C) => (float[1, 2] y) <float[2, 2] B = {1, 0, 0, 1}, float[2] s = {1, 1},
                                                     float[2] b = {0, 0}, float[2] m = {0, 0}, float[2] v = {1, 1}> {
        h = Gemm (x, B, C)
        y = BatchNormalization (h, s, b, m, v)
    }""")
    assert lint(model) == []
