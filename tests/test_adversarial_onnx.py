"""Adversarial tests of the ONNX side (``bnfold fuse model.onnx``, ``bnfold export``, ``bnfold verify`` with ONNX).

Each test is one attack a hostile (or just unlucky) user can mount with a file or a command line, and the
behaviour the product promises for it (README: exit codes, "Security: what runs code", atomic outputs that
never overwrite an input, external data only from the model's folder, timeouts, signals). Tests in the first
section pin down holes found when this file was written (they fail until the code is fixed); those in the
second guard attacks that already hold.
"""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnx.parser
import pytest
import torch
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from bnfold.cli import main
from bnfold.errors import BnfoldError, InputSpecError, LoadError
from bnfold.onnx.fold import fold_graph
from bnfold.onnx.io import load_onnx
from tests.onnx_graphs import run as ort_run

ROOT = Path(__file__).resolve().parents[1]
POSIX = pytest.mark.skipif(sys.platform == "win32", reason="FIFOs, signals and rlimits are POSIX notions")

CONV_BN = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N,2,4,4] x) => (float[N,3,4,4] y) {
    z = Conv <pads = [1,1,1,1]> (x, w)
    y = BatchNormalization (z, s, b, m, v)
}"""

# 10**12 trips of a cheap op: runs for days unless stopped.
LOOP_BN = """
<ir_version: 8, opset_import: ["" : 15]>
spin (float[N,2,4,4] x) => (float[N,3,4,4] y) {
    z = Conv <pads = [1,1,1,1]> (x, w)
    trips = Constant <value = int64 {1000000000000}> ()
    keep_going = Constant <value = bool {1}> ()
    l = Loop (trips, keep_going, z) <body = step (int64 i, bool cond, float[N,3,4,4] acc)
                                                => (bool cond_out, float[N,3,4,4] acc_out) {
        cond_out = Identity (cond)
        acc_out = Abs (acc)
    }>
    y = BatchNormalization (l, s, b, m, v)
}"""

RELU = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N,2] x) => (float[N,2] y) {
    y = Relu (x)
}"""


def params(channels: int = 3, in_channels: int = 2, seed: int = 0, **override) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    values = {"w": rng.normal(size=(channels, in_channels, 3, 3)) * 0.5, "s": rng.uniform(0.5, 1.5, channels),
              "b": rng.normal(size=channels), "m": rng.normal(size=channels), "v": rng.uniform(0.5, 2.0, channels)}
    values.update(override)
    return {k: np.asarray(v, dtype=np.float32) for k, v in values.items()}


def graph(text: str = CONV_BN, eps: float | None = None, **override) -> onnx.ModelProto:
    """``text`` with its free parameters (w, s, b, m, v and any suffixed copies) as seeded initializers."""
    model = onnx.parser.parse_model(text)
    declared = {name for node in model.graph.node for name in node.input} - {i.name for i in model.graph.input} - {
        out for node in model.graph.node for out in node.output}
    for name in sorted(declared):
        if not name:
            continue
        base = name.rstrip("0123456789")
        value = params(seed=len(name) + ord(name[-1]), **override)[base]
        model.graph.initializer.append(numpy_helper.from_array(value, name))
    if eps is not None:
        for node in model.graph.node:
            if node.op_type == "BatchNormalization":
                node.attribute.append(helper.make_attribute("epsilon", float(eps)))
    return model


def save(model: onnx.ModelProto, path: Path) -> Path:
    path.write_bytes(model.SerializeToString())
    return path


def with_external(path: Path, location: str, *, tensor: str = "w", offset: int | None = None,
                  length: int | None = None, model: onnx.ModelProto | None = None) -> Path:
    """Write ``model`` (CONV_BN by default) to ``path`` with ``tensor``'s data declared at ``location``."""
    model = model or graph()
    target = next(t for t in model.graph.initializer if t.name == tensor)
    target.ClearField("raw_data")
    target.data_location = TensorProto.EXTERNAL
    entries = [("location", location)] + [(k, str(v)) for k, v in (("offset", offset), ("length", length))
                                          if v is not None]
    for key, value in entries:
        entry = target.external_data.add()
        entry.key, entry.value = key, value
    return save(model, path)


def with_data_file(folder: Path, name: str, location: str) -> Path:
    """A CONV_BN model ``folder/name`` whose tensors all live in ``folder/location`` (as onnx writes them)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    onnx.save_model(graph(), str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=location, size_threshold=0)
    return path


def cli(*args: str):
    return CliRunner().invoke(main, list(args))


def assert_clean_error(result) -> None:
    """Exit 2 with bnfold's own one-line message: no traceback, no "please report it" (that is for bugs)."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert "please report" not in result.output, result.output
    assert result.output.startswith("error: "), result.output


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


# ================================================================================================================
# Holes: these fail until the code is fixed.
# ================================================================================================================

# -- an output must never overwrite an input: the input's external data files are inputs too -------------------
def test_fuse_refuses_an_output_that_is_the_inputs_external_data_file(tmp_path):
    """Attack: ``bnfold fuse a.onnx -o weights.bin`` where a.onnx keeps its tensors in weights.bin.
    Expected: refused before anything runs (exit 2, "never overwrites its inputs"); weights.bin unchanged, so
    a.onnx still loads. Today the folded model is written over weights.bin and a.onnx is destroyed."""
    model = with_data_file(tmp_path, "a.onnx", "weights.bin")
    before = (tmp_path / "weights.bin").read_bytes()
    result = cli("fuse", str(model), "-o", str(tmp_path / "weights.bin"))
    assert_clean_error(result)
    assert (tmp_path / "weights.bin").read_bytes() == before
    load_onnx(model)


def test_fuse_refuses_an_output_whose_data_file_is_the_inputs_data_file(tmp_path):
    """Attack: b.onnx keeps its tensors in ``out.onnx.data``; ``bnfold fuse b.onnx -o out.onnx`` writes its own
    data file to ``out.onnx.data`` (the input had external data). Expected: refused (exit 2), the input's data
    file untouched. Today it is replaced, and b.onnx no longer loads."""
    model = with_data_file(tmp_path, "b.onnx", "out.onnx.data")
    before = (tmp_path / "out.onnx.data").read_bytes()
    result = cli("fuse", str(model), "-o", str(tmp_path / "out.onnx"))
    assert_clean_error(result)
    assert (tmp_path / "out.onnx.data").read_bytes() == before
    load_onnx(model)


def test_verify_refuses_a_report_written_over_the_models_external_data(tmp_path):
    """Attack: ``bnfold verify a.onnx --json weights.bin`` where a.onnx keeps its tensors in weights.bin.
    Expected: refused (exit 2), weights.bin untouched. Today the JSON report replaces the model's weights."""
    model = with_data_file(tmp_path, "a.onnx", "weights.bin")
    before = (tmp_path / "weights.bin").read_bytes()
    result = cli("verify", str(model), "--json", str(tmp_path / "weights.bin"))
    assert_clean_error(result)
    assert (tmp_path / "weights.bin").read_bytes() == before


# -- verify MODEL --onnx FILE: FILE is read with bnfold's loader, not raw onnx.load -----------------------------
@pytest.mark.parametrize("content", [pickle.dumps({"a": 1}), b"\x08\x07garbage\xff\xff\xff"], ids=["pickle", "junk"])
def test_verify_onnx_option_that_is_not_an_onnx_file_is_a_load_error(tmp_path, content):
    """Attack: ``bnfold verify MODEL --onnx FILE`` where FILE is a pickle or junk, not a protobuf.
    Expected: a LoadError (exit 2, one line, no "please report it"). Today protobuf's DecodeError escapes
    (bnfold/onnx/check.py calls onnx.load directly)."""
    path = tmp_path / "model.onnx"
    path.write_bytes(content)
    with pytest.raises(BnfoldError):
        from bnfold.verify import verify

        verify(nn.ReLU(), (torch.randn(2, 2),), onnx=path, checks=("onnx",))


def test_verify_onnx_option_with_external_data_outside_its_folder_is_a_load_error(tmp_path):
    """Attack: the --onnx file's Dropout training_mode flag is an external tensor at an absolute path.
    Expected: the same LoadError ``bnfold fuse`` gives ("outside the model's folder"), exit 2. Today the lint
    reads it with onnx's own loader (numpy_helper.to_array(base_dir=...)) and its ValidationError escapes as a
    "please report it" bug."""
    secret = tmp_path / "secret"
    secret.write_bytes(b"\x01")
    model = onnx.parser.parse_model("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N,2] x) => (float[N,2] y) {
        r = Relu (x)
        y = Dropout (r, ratio, flag)
    }""")
    model.graph.initializer.append(numpy_helper.from_array(np.array(0.5, np.float32), "ratio"))
    flag = numpy_helper.from_array(np.array(False), "flag")
    model.graph.initializer.append(flag)
    folder = tmp_path / "m"
    folder.mkdir()
    path = with_external(folder / "m.onnx", str(secret), tensor="flag", model=model)
    from bnfold.verify import verify

    with pytest.raises(LoadError, match="outside"):
        verify(nn.ReLU(), (torch.randn(2, 2),), onnx=path, checks=("onnx",))


# -- sizes declared by the file ---------------------------------------------------------------------------------
@POSIX
def test_fuse_huge_declared_input_is_refused_before_allocating(tmp_path):
    """Attack: a graph input declared [1, 100000, 100000] (10**10 floats, 40 GB of random inputs).
    Expected: refused with bnfold's own one-line error naming the input (exit 2) before anything is allocated.
    Today torch tries to allocate 40 GB: under a memory limit that is "RuntimeError: DefaultCPUAllocator: can't
    allocate memory ... please report it"; on a large machine it fills the memory. (The child runs under an
    8 GiB address-space limit so that this test cannot take the machine down.)"""
    path = save(onnx.parser.parse_model("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[1,100000,100000] x) => (float[1,100000,100000] y) {
        y = Relu (x)
    }"""), tmp_path / "huge.onnx")
    child = bnfold_child("fuse", str(path), "-o", str(tmp_path / "out.onnx"), cwd=tmp_path,
                         address_space=8 << 30)
    _, err = child.communicate(timeout=120)
    assert child.returncode == 2, err[-2000:]
    assert err.startswith("error: "), err[-2000:]
    assert "please report" not in err and "Traceback" not in err, err[-2000:]
    assert "allocat" not in err.lower(), err[-2000:]  # bnfold's own refusal, not the allocator's failure


@pytest.mark.parametrize("dims", [[10**12], [2**40, 2**40]], ids=["1e12-elements", "int64-overflow"])
def test_tensor_declaring_more_elements_than_it_holds_is_a_load_error(tmp_path, dims):
    """Attack: the BN's running_var declares 10**12 elements (or a shape whose element count overflows int64)
    but holds 3 floats. Expected: refused when loaded (LoadError naming the tensor; exit 2 on the command line).
    Today bnfold.onnx.io.load_onnx accepts it and the fold dies in numpy ("ValueError: cannot reshape array of
    size 3 ... please report it")."""
    model = graph()
    var = next(t for t in model.graph.initializer if t.name == "v")
    del var.dims[:]
    var.dims.extend(dims)
    path = save(model, tmp_path / "model.onnx")
    with pytest.raises(LoadError, match="'v'"):
        load_onnx(path)
    assert_clean_error(cli("fuse", str(path), "-o", str(tmp_path / "out.onnx")))


# -- graphs bnfold cannot draw inputs for must say so ------------------------------------------------------------
NO_INPUTS = """
<ir_version: 8, opset_import: ["" : 17]>
g () => (float[1,3,2,2] y) {
    c = Constant <value = float[1,3,2,2] {1,2,3,4,5,6,7,8,9,10,11,12}> ()
    z = Conv (c, w)
    y = BatchNormalization (z, s, b, m, v)
}"""


@pytest.mark.parametrize("command", ["fuse", "verify"])
def test_graph_without_inputs_is_not_a_crash(tmp_path, command):
    """Attack: a valid graph with no inputs at all (everything is a constant).
    Expected: folded and proven (exit 0; onnxruntime runs it with no feeds) or a clear refusal (exit 2); never
    a crash. Today: "IndexError: list index out of range" (fuse, bnfold/runtime.parity_inputs reads specs[0])
    and "KeyError: 'determinism'" (verify), both with "please report it"."""
    model = graph(NO_INPUTS, w=np.ones((3, 3, 1, 1)))
    onnx.checker.check_model(model, full_check=True)
    path = save(model, tmp_path / "no_inputs.onnx")
    args = ["fuse", str(path), "-o", str(tmp_path / "out.onnx")] if command == "fuse" else ["verify", str(path)]
    result = cli(*args)
    assert "please report" not in result.output, result.output
    assert result.exit_code in (0, 2), result.output


def test_scalar_graph_input_is_not_a_crash(tmp_path):
    """Attack: a graph whose input is a rank-0 tensor (``float x``, valid ONNX).
    Expected: proven (exit 0) or a clear refusal (exit 2). Today: "IndexError: tuple index out of range ...
    please report it" (bnfold/runtime.parity_inputs takes ``specs[0].shape[0]`` of a shape ``()``)."""
    path = save(onnx.parser.parse_model("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float x) => (float y) {
        y = Relu (x)
    }"""), tmp_path / "scalar.onnx")
    result = cli("fuse", str(path), "-o", str(tmp_path / "out.onnx"))
    assert "please report" not in result.output, result.output
    assert result.exit_code in (0, 2), result.output


def test_unknown_input_element_type_is_a_clean_error(tmp_path):
    """Attack: a graph input whose elem_type is 999 (no such TensorProto.DataType).
    Expected: "ONNX input 'x' has element type 999, which bnfold cannot draw inputs for" (exit 2). Today the
    message itself crashes: DataType.Name(999) raises "ValueError: Enum DataType has no name defined for value
    999 ... please report it" (bnfold/onnx/fuse._torch_dtype; bnfold.onnx.graph._type_name handles this)."""
    info = helper.make_tensor_value_info("x", 999, [2])
    out = onnx.ValueInfoProto(name="y")
    out.type.CopyFrom(info.type)
    model = helper.make_model(helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [info], [out]),
                              opset_imports=[helper.make_opsetid("", 17)])
    path = save(model, tmp_path / "e999.onnx")
    assert_clean_error(cli("fuse", str(path), "-o", str(tmp_path / "out.onnx")))


# -- node names: a user's name may equal the label bnfold makes up for an unnamed node ---------------------------
TWO_BRANCHES = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N,2,4,4] x) => (float[N,3,4,4] y1, float[N,3,4,4] y2) {
    z1 = Conv <pads = [1,1,1,1]> (x, w1)
    y1 = BatchNormalization (z1, s1, b1, m1, v1)
    z2 = Conv <pads = [1,1,1,1]> (x, w2)
    y2 = BatchNormalization (z2, s2, b2, m2, v2)
}"""


def test_node_named_like_another_nodes_label_folds_both_correctly():
    """Attack: the first Conv/BN pair is unnamed (labels "Conv#0", "BatchNormalization#1") and the second pair is
    *named* "Conv#0" / "BatchNormalization#1" (valid: ONNX node names are unique, the first ones are empty).
    Expected: both BNs folded into their own Conv, outputs unchanged. Today the labels collide
    (bnfold/onnx/graph.py: node_label, OnnxHost._by_label): one BN vanishes from the report, both folds land on
    one Conv, and ``bnfold fuse`` reports a false parity FAILED."""
    model = graph(TWO_BRANCHES)
    model.graph.node[2].name, model.graph.node[3].name = "Conv#0", "BatchNormalization#1"
    result = fold_graph(model)
    assert len(result.folded) == 2 and not result.skipped, (result.folded, result.skipped)
    assert not any(n.op_type == "BatchNormalization" for n in result.model.graph.node)
    x = {"x": np.random.default_rng(1).normal(size=(2, 2, 4, 4)).astype(np.float32)}
    for want, got in zip(ort_run(model, x), ort_run(result.model, x)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


# -- the written graph passes onnx.checker's full check (README: bnfold fuse model.onnx) -------------------------
def test_fuse_never_writes_a_graph_that_fails_the_checker(tmp_path):
    """Attack: IR version 2 with an opset_import (invalid: "model with IR version < 3 cannot have opset_import
    specified"), which onnxruntime runs anyway. Expected: refused as an invalid model (exit 2), or a written
    result that passes onnx.checker's full check, as the README promises. Today fuse writes it, exit 0, and
    the output fails the checker (bnfold/onnx/fuse.py never runs the checker; export and verify do)."""
    model = graph()
    model.ir_version = 2
    path = save(model, tmp_path / "ir2.onnx")
    out = tmp_path / "out.onnx"
    result = cli("fuse", str(path), "-o", str(out))
    if result.exit_code == 2:
        assert_clean_error(result)
        assert not out.exists()
        return
    assert result.exit_code == 0, result.output
    onnx.checker.check_model(onnx.load(str(out)), full_check=True)


# -- the skip reason names the real cause -------------------------------------------------------------------------
@pytest.mark.parametrize("broken", ["epsilon", "conv weight"])
def test_non_finite_fold_reason_names_the_real_cause(broken):
    """Attack: BN epsilon = NaN, or a NaN in the Conv's own weight (statistics fine). Expected: the BN is skipped
    (it is) with a reason that points at the NaN. Today both say "folded weights of Conv#0 overflow float32
    ...: a tiny running_var magnifies them; keep this BN, or fold in float32": wrong cause, impossible advice
    (bnfold/fold/apply.py apply_fold; epsilon is never checked in bn_params)."""
    if broken == "epsilon":
        model = graph(eps=float("nan"))
    else:
        weight = params()["w"].copy()
        weight[0, 0, 0, 0] = np.nan
        model = graph(w=weight)
    result = fold_graph(model)
    assert not result.folded
    reason = result.skipped[0].reason
    assert "running_var magnifies" not in reason, reason
    assert "not finite" in reason or "nan" in reason.lower(), reason


# -- bnfold export --opset -----------------------------------------------------------------------------------------
def test_export_opset_beyond_what_onnx_knows_is_refused_or_honoured(tmp_path):
    """Attack: ``bnfold export ... --opset 30`` (the installed onnx knows opsets up to 28). Expected: refused
    (exit 2: which opsets the exporter supports), or a graph of opset 30. Today the dynamo exporter's
    conversion fails silently (its warning is captured) and bnfold writes an opset-18 graph, PASSED, without a
    word (bnfold/export.py / bnfold/onnx/export.py; the --opset option is only IntRange(min=9))."""
    from bnfold.export import export

    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3)).eval()
    model[1].running_var.fill_(1.5)
    model[1].num_batches_tracked += 1
    out = tmp_path / "m.onnx"
    try:
        result = export(model, (torch.randn(2, 2, 4, 4),), out, opset=30)
    except BnfoldError:
        assert not out.exists()
        return
    if result.ok:
        versions = {o.domain or "ai.onnx": o.version for o in onnx.load(str(out)).opset_import}
        assert versions["ai.onnx"] == 30, f"asked for opset 30, wrote {versions}: {result.notes}"
    else:
        assert not out.exists()


# -- interrupting verify -j ------------------------------------------------------------------------------------------
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


# -- Ctrl-C at any time ----------------------------------------------------------------------------------------------
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


# -- library warnings are not bnfold's one-line error --------------------------------------------------------------
@POSIX
def test_pickle_named_model_onnx_gets_one_error_line_and_no_library_warning(tmp_path):
    """Attack: a protocol-4 pickle named model.onnx. Expected: refused (exit 2) with bnfold's "error:" line and
    its Note only. Today torch's weights-only unpickler first prints a two-line UserWarning ("Detected pickle
    protocol 4 ... please file an issue"), so the user sees another library's traceback-like noise and an
    invitation to file an issue (bnfold/load.py _load_torch_file; likewise onnx's "Ignoring unknown external data
    key(s)" warning from bnfold/onnx/io._info)."""
    path = tmp_path / "model.onnx"
    path.write_bytes(pickle.dumps({"w": [1.0, 2.0]}, protocol=4))
    child = bnfold_child("fuse", str(path), "-o", str(tmp_path / "out.onnx"), cwd=tmp_path)
    _, err = child.communicate(timeout=120)
    assert child.returncode == 2, err[-2000:]
    assert err.startswith("error: "), err[-2000:]
    assert "Warning" not in err, err[-2000:]


# ================================================================================================================
# Attacks that hold today: guarded so that they keep holding.
# ================================================================================================================

@POSIX
@pytest.mark.parametrize("trick", ["dev-zero-link", "fifo", "link-to-fifo", "wrong-length", "offset-past-end",
                                   "negative-offset", "folder"])
def test_external_data_tricks_are_refused_before_anything_is_read(tmp_path, trick):
    """Attack: external data that is a symlink to /dev/zero (endless), a FIFO (a read blocks forever), a link to a
    FIFO, a length that disagrees with the shape, an offset past the end, a negative offset, a folder.
    Expected: LoadError before any data is read; never a hang."""
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "w.bin").write_bytes(np.ones(54, np.float32).tobytes())
    location, offset, length = "w.bin", None, None
    if trick == "dev-zero-link":
        os.symlink("/dev/zero", folder / "zero")
        location = "zero"
    elif trick == "fifo":
        os.mkfifo(folder / "fifo")
        location = "fifo"
    elif trick == "link-to-fifo":
        os.mkfifo(folder / "f")
        os.symlink("f", folder / "lf")
        location = "lf"
    elif trick == "wrong-length":
        length = 12
    elif trick == "offset-past-end":
        offset = 10**30
    elif trick == "negative-offset":
        offset = -4
    elif trick == "folder":
        (folder / "sub").mkdir()
        location = "sub"
    path = with_external(folder / "model.onnx", location, offset=offset, length=length)
    with pytest.raises(LoadError):
        load_onnx(path)


def test_nul_byte_in_a_data_location_is_a_load_error(tmp_path):
    """Attack: an external data location with an embedded NUL byte. Expected: LoadError through bnfold.load."""
    from bnfold.load import load

    path = with_external(tmp_path / "model.onnx", "w\x00.bin")
    with pytest.raises(LoadError):
        load(path)


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


@pytest.mark.parametrize("case", ["var-nan", "var0-eps0", "output-inf"])
def test_non_finite_graphs_never_pass(tmp_path, case):
    """Attack: BN running_var NaN; running_var 0 with epsilon 0; a graph whose output is x/0. Expected: the BN is
    not folded into non-finite weights, and since the outputs are not finite the run fails (exit 1), nothing
    written."""
    if case == "var-nan":
        model = graph(v=[np.nan, 0.5, 0.5])
    elif case == "var0-eps0":
        model = graph(eps=0.0, v=[0.0, 0.5, 0.5])
    else:
        model = graph(CONV_BN.replace("y = BatchNormalization (z, s, b, m, v)",
                                      "q = BatchNormalization (z, s, b, m, v)\n"
                                      "    zero = Constant <value = float {0.0}> ()\n    y = Div (q, zero)"))
    out = tmp_path / "out.onnx"
    result = cli("fuse", str(save(model, tmp_path / "m.onnx")), "-o", str(out))
    assert result.exit_code == 1, result.output
    assert not out.exists()


def test_graph_output_that_is_a_graph_input_and_zero_node_graphs_pass(tmp_path):
    """Attack: a graph output that is the graph input itself (beside a foldable pair), and a graph with no
    nodes at all. Expected: both proven and written (exit 0), names kept."""
    passthrough = CONV_BN.replace("=> (float[N,3,4,4] y)", "=> (float[N,3,4,4] y, float[N,2,4,4] x)")
    empty = onnx.parser.parse_model('<ir_version: 8, opset_import: ["" : 17]>\ng (float[N,2] x) => (float[N,2] x) {\n}')
    for name, model in (("passthrough", graph(passthrough)), ("empty", empty)):
        out = tmp_path / f"{name}.out.onnx"
        result = cli("fuse", str(save(model, tmp_path / f"{name}.onnx")), "-o", str(out))
        assert result.exit_code == 0, result.output
        assert [o.name for o in onnx.load(str(out)).graph.output] == [o.name for o in model.graph.output]


@pytest.mark.parametrize("change", ["ir99", "opset6", "opset30", "custom-domain"])
def test_versions_and_domains_bnfold_does_not_fold_are_load_errors(tmp_path, change):
    """Attack: IR version 99, opset 6, opset 30, an operator from an unknown domain. Expected: exit 2, one line."""
    model = graph()
    if change == "ir99":
        model.ir_version = 99
    elif change.startswith("opset"):
        model.opset_import[0].version = int(change.removeprefix("opset"))
    else:
        model.graph.node[0].domain = "com.evil"
        model.opset_import.append(helper.make_opsetid("com.evil", 1))
    assert_clean_error(cli("fuse", str(save(model, tmp_path / "m.onnx")), "-o", str(tmp_path / "out.onnx")))


@pytest.mark.parametrize("command", ["fuse", "verify"])
def test_pickle_named_model_onnx_is_refused_and_never_runs(tmp_path, command):
    """Attack: a pickle that would create a file when unpickled, named model.onnx. Expected: refused (exit 2),
    the file never created."""

    class WritesAFile:
        def __reduce__(self):
            return (open, (str(tmp_path / "PWNED"), "w"))

    path = tmp_path / "model.onnx"
    path.write_bytes(pickle.dumps(WritesAFile()))
    args = ["fuse", str(path), "-o", str(tmp_path / "out.onnx")] if command == "fuse" else ["verify", str(path)]
    result = cli(*args)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and "please report" not in result.output
    assert not (tmp_path / "PWNED").exists()


def test_output_clashes_are_refused(tmp_path):
    """Attack: -o equal to the input, a symlink or a hard link to it; --external-data with -o whose .data is a
    folder; --json equal to the data file. Expected: each refused before anything runs (exit 2)."""
    model = save(graph(), tmp_path / "m.onnx")
    os.symlink(model, tmp_path / "link.onnx")
    os.link(model, tmp_path / "hard.onnx")
    (tmp_path / "x.onnx.data").mkdir()
    before = model.read_bytes()
    for args in (["-o", str(model)], ["-o", str(tmp_path / "link.onnx")], ["-o", str(tmp_path / "hard.onnx")],
                 ["-o", str(tmp_path / "x.onnx"), "--external-data"],
                 ["-o", str(tmp_path / "y.onnx"), "--external-data", "--json", str(tmp_path / "y.onnx.data")]):
        assert_clean_error(cli("fuse", str(model), *args))
    assert model.read_bytes() == before


def test_onnx_input_shape_that_disagrees_with_the_graph_is_refused(tmp_path):
    """Attack: --input-shape of the wrong rank, contradicting a fixed dimension, too many specs, a zero size.
    Expected: exit 2 with one line naming the input and the disagreement, before onnxruntime runs."""
    model = str(save(graph(), tmp_path / "m.onnx"))
    for shape, words in ((["2,2,4"], "rank"), (["2,3,4,4"], "fixed at 2"), (["1,2,4,4", "1,2,4,4"], "gave 2"),
                         (["0,2,4,4"], "positive")):
        result = cli("fuse", model, "-o", str(tmp_path / "out.onnx"),
                     *[a for s in shape for a in ("--input-shape", s)])
        assert_clean_error(result)
        assert words in result.output


def test_export_usage_errors(tmp_path):
    """Attack: --opset 8 (below what bnfold supports) and --keep-io-types without --fp16. Expected: exit 2 /
    InputSpecError before any work."""
    result = cli("export", str(tmp_path / "missing.pt2"), "--opset", "8")
    assert result.exit_code == 2 and "Traceback" not in result.output
    from bnfold.export import export

    with pytest.raises(InputSpecError, match="--keep-io-types"):
        export(nn.Linear(2, 2), (torch.randn(2, 2),), tmp_path / "m.onnx", keep_io_types=True)
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.parametrize("force", [False, True])
def test_export_of_a_model_whose_eval_output_is_nan_writes_nothing(tmp_path, force):
    """Attack: a model whose eval output is NaN (a NaN conv weight). Expected: stopped (audit BN014, or with
    --force the parity check: NaN never passes), nothing written."""
    from bnfold.export import export

    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3)).eval()
    model[1].running_var.fill_(1.5)
    model[1].num_batches_tracked += 1
    with torch.no_grad():
        model[0].weight[0, 0, 0, 0] = float("nan")
    out = tmp_path / "nan.onnx"
    result = export(model, (torch.randn(2, 2, 4, 4),), out, force=force, exporter="torchscript")
    assert not result.ok and result.stopped
    assert not out.exists() and not (tmp_path / "nan.onnx.data").exists()
