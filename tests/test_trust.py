"""The trust gate: without ``--trust``, nothing in a model file (or a checkout's config) runs code or touches files.

The hostile files come from ``tests/hostile.py``; each leaves evidence when it runs (a marker file appears or a
victim file loses its bytes), and each was checked to fire under plain torch. Every test arms the evidence, runs
bnfold, and asserts the evidence is absent *before* it looks at exit codes and messages: the security property
first, the wording second. Refused means: exit 2, one ``error:`` line, no traceback or "please report", a Note
naming ``--trust`` (not just ``--trust-pickle``), and nothing written.

The corpus is built once per session. The zip bombs run in a child process, so that their peak memory can be
measured (and a bomb that gets through cannot take pytest with it).
"""

from __future__ import annotations

import json
import pickle
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import bnfold
from bnfold import errors
from bnfold.load import load
from tests import hostile
from tests.cli_helpers import assert_clean_error, cli, run
from tests.conftest import ROOT

SHAPE = ["--input-shape", hostile.SHAPE_ARG]
#: ``--trust`` as a flag of its own: "--trust-pickle" does not count.
TRUST_FLAG = re.compile(r"--trust(?![-\w])")
#: None until the trust model lands; the tests then fail on it, after the evidence check.
UnsafeModelError = getattr(errors, "UnsafeModelError", None)
#: Archives refused as malformed whether trusted or not (ambiguous or escaping member names): --trust cannot
#: help, so their Note says to re-save the file, and the API raises a plain LoadError.
MALFORMED = {"pt2_duplicate_config": "appears more than once", "pt2_aoti_zip_slip": "points outside the archive"}


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    corpus = hostile.build_corpus(tmp_path_factory.mktemp("hostile"))
    np.save(corpus.folder / "calib.npy", np.random.default_rng(0).standard_normal((8, *hostile.INPUT_SHAPE[1:]),
                                                                                  dtype=np.float32))
    return corpus


@pytest.fixture(autouse=True)
def private_tmpdir(tmp_path, monkeypatch):
    """torch's AOTInductor loader extracts into $TMPDIR and leaks the folder when it fails (every hostile case)."""
    monkeypatch.setenv("TMPDIR", str(tmp_path))


@pytest.fixture
def attack(corpus, request) -> hostile.Attack:
    """The attack named by the test's (indirect) ``attack`` parameter, armed: no marker, victim intact."""
    chosen = corpus.attacks[request.param]
    chosen.arm()
    return chosen


@pytest.fixture
def isolated_imports(monkeypatch):
    """bnfold puts project folders on sys.path and imports their modules: undo both after the test."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    before = set(sys.modules)
    yield
    for name in set(sys.modules) - before:
        if name.startswith(("evilpkg_", "evildata_")):
            del sys.modules[name]


def command_args(command: str, path, corpus, out) -> list:
    """Arguments that would make ``command`` load and run ``path`` (given as flags the file might need)."""
    if command == "fuse":
        return ["fuse", path, "-o", out, *SHAPE]
    if command == "verify":
        return ["verify", path, *SHAPE, "--skip", "onnx"]
    return ["recalibrate", path, "--data", corpus.folder / "calib.npy", "-o", out]


def assert_clean_failure(result) -> None:
    """Exit 2 through bnfold's error path: one ``error:`` line, no traceback, not reported as a bug."""
    out = result.output
    assert result.exit_code == 2, out
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert out.startswith("error: "), out
    assert sum(line.startswith("error:") for line in out.splitlines()) == 1, out
    assert "Traceback" not in out and "please report" not in out, out


def assert_refused(result, *fragments: str) -> None:
    """A clean failure whose Note names ``--trust``."""
    assert_clean_failure(result)
    notes = [line for line in result.output.splitlines() if line.startswith("Note:")]
    assert notes and TRUST_FLAG.search(notes[0]), f"no Note naming --trust:\n{result.output}"
    for fragment in fragments:
        assert fragment in result.output, result.output


def assert_unsafe_model_error(exc: BaseException | None) -> None:
    assert UnsafeModelError is not None, "bnfold.errors.UnsafeModelError does not exist"
    assert isinstance(exc, UnsafeModelError), f"expected UnsafeModelError, got {exc!r}"
    assert TRUST_FLAG.search(str(exc)), f"the error does not name --trust: {exc}"


def raised(call) -> BaseException | None:
    try:
        call()
    except Exception as exc:  # noqa: BLE001 - the tests inspect what was raised, after the evidence
        return exc
    return None


# -- hostile files: refused, without running anything ---------------------------------------------------------------
@pytest.mark.parametrize("command", ["fuse", "verify"])
@pytest.mark.parametrize("attack", hostile.ALL_ATTACKS, indirect=True)
def test_hostile_file_is_refused_before_it_runs(corpus, attack, command, tmp_path):
    out = tmp_path / "out.bin"
    result = cli(*command_args(command, attack.path, corpus, out))
    assert not attack.fired(), f"{attack.name} ran: {attack.evidence}\n{result.output}"
    if attack.name in MALFORMED:
        assert_clean_failure(result)
        assert MALFORMED[attack.name] in result.output and "re-save" in result.output, result.output
    else:
        assert_refused(result)
    assert not out.exists()


@pytest.mark.parametrize("attack", sorted(MALFORMED), indirect=True)
def test_malformed_archive_is_refused_even_with_trust(attack, tmp_path):
    result = cli("fuse", attack.path, "-o", tmp_path / "out.pt2", *SHAPE, "--trust")
    assert not attack.fired(), f"{attack.name} ran with --trust: {attack.evidence}\n{result.output}"
    assert_clean_failure(result)
    assert MALFORMED[attack.name] in result.output


@pytest.mark.parametrize("attack", hostile.ALL_ATTACKS, indirect=True)
def test_recalibrate_never_runs_a_hostile_file(corpus, attack, tmp_path):
    """recalibrate refuses non-eager files anyway; what matters is that it refuses before loading them."""
    out = tmp_path / "out.bin"
    result = cli(*command_args("recalibrate", attack.path, corpus, out))
    assert not attack.fired(), f"{attack.name} ran: {attack.evidence}\n{result.output}"
    assert_clean_failure(result)
    assert not out.exists()


def test_refusal_names_what_would_run(corpus):
    """The error says why (pickle, operator, compile command...) and the Note says how to proceed."""
    attack = corpus.attacks["pt2_pickled_weight"]
    attack.arm()
    result = cli("fuse", attack.path, *SHAPE)
    assert not attack.fired()
    assert_refused(result, str(attack.path))
    assert re.search(r"pickle", result.output.splitlines()[0]), result.output


# -- pickles are never unpickled without --trust, whatever the file is called --------------------------------------
class _WritesAFile:
    """Unpickling this would create a file: the proof that bnfold never executes an untrusted pickle."""

    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


def test_malicious_pickle_is_not_executed(tmp_path):
    victim = tmp_path / "pwned.txt"
    bad = tmp_path / "evil.pt"
    torch.save({"weights": _WritesAFile(str(victim))}, bad)
    assert not victim.exists()
    result = run(str(bad), *SHAPE)
    assert_clean_error(result, "refusing to unpickle", "--trust")
    assert not victim.exists()
    # A legacy (non-zip) plain pickle is refused the same way.
    legacy = tmp_path / "evil.pkl"
    legacy.write_bytes(pickle.dumps(_WritesAFile(str(victim)), protocol=2))
    assert_clean_error(run(str(legacy), *SHAPE))
    assert not victim.exists()


def test_whole_module_pickle_refused_by_default(tmp_path, digits_model, in_root):
    path = tmp_path / "model.pt"
    torch.save(digits_model, path)
    assert_clean_error(run(str(path), *SHAPE), "refusing to unpickle", "models.resnet")
    assert list(tmp_path.iterdir()) == [path]


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


# -- the Python API ---------------------------------------------------------------------------------------------------
def test_error_hierarchy():
    assert UnsafeModelError is not None, "bnfold.errors.UnsafeModelError does not exist"
    assert issubclass(UnsafeModelError, errors.LoadError)
    assert issubclass(errors.UnsafePickleError, UnsafeModelError)


@pytest.mark.parametrize("attack", hostile.ALL_ATTACKS, indirect=True)
def test_load_raises_unsafe_model_error(attack):
    exc = raised(lambda: load(attack.path))
    assert not attack.fired(), f"{attack.name} ran during load(): {attack.evidence}"
    if attack.name in MALFORMED:
        assert isinstance(exc, errors.LoadError) and MALFORMED[attack.name] in str(exc), repr(exc)
    else:
        assert_unsafe_model_error(exc)


@pytest.mark.parametrize("attack", ["pt2_pickled_weight", "pt2_graph_writes_file", "ts_setstate_writes_file",
                                    "ts_forward_writes_file", "whole_pickle"], indirect=True)
def test_verify_api_raises_unsafe_model_error(attack):
    exc = raised(lambda: bnfold.verify(attack.path, hostile.example_input(), checks=("audit",)))
    assert not attack.fired(), f"{attack.name} ran during bnfold.verify(): {attack.evidence}"
    assert_unsafe_model_error(exc)


@pytest.mark.parametrize("attack", ["pt2_pickled_weight", "pt2_pickled_sample_inputs", "pt2_opaque_constant",
                                    "ts_setstate_writes_file", "whole_pickle"], indirect=True)
def test_load_with_trust_runs_the_file(attack):
    loaded = load(attack.path, trust=True)
    assert attack.fired(), "trust=True is consent: the file's code runs"
    assert loaded.model is not None


def test_verify_api_with_trust(corpus):
    attack = corpus.attacks["pt2_pickled_weight"]
    attack.arm()
    report = bnfold.verify(attack.path, checks=("audit",), trust=True)
    assert attack.fired()
    assert report.checks, report


def test_trust_pickle_keyword_still_accepted(corpus):
    attack = corpus.attacks["whole_pickle"]
    attack.arm()
    assert load(attack.path, trust_pickle=True).format == "pickle"
    assert attack.fired()


# -- --trust on the command line: the file runs ---------------------------------------------------------------------
@pytest.mark.parametrize("flag", ["--trust", "--trust-pickle"])
@pytest.mark.parametrize("attack", ["pt2_pickled_weight", "pt2_pickled_sample_inputs", "ts_setstate_writes_file",
                                    "whole_pickle"], indirect=True)
def test_trust_flag_lets_the_file_run(attack, flag, tmp_path):
    out = tmp_path / f"out{attack.path.suffix}"
    result = cli("fuse", attack.path, "-o", out, *SHAPE, flag)
    assert result.exit_code == 0, result.output
    assert attack.fired(), f"{flag} is consent: the file's code runs"
    assert out.exists()


@pytest.mark.parametrize("command", ["verify", "recalibrate"])
def test_trust_flag_on_other_commands(corpus, command, tmp_path):
    attack = corpus.attacks["whole_pickle"]
    attack.arm()
    result = cli(*command_args(command, attack.path, corpus, tmp_path / "out.pt"), "--trust")
    assert result.exit_code in (0, 1), result.output  # 1: verify's findings, not a refusal
    assert attack.fired()


# -- the legitimate twins: no --trust needed ---------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["legit_pt2", "legit_torchscript"])
@pytest.mark.parametrize("command", ["fuse", "verify"])
def test_legitimate_files_need_no_trust(corpus, which, command, tmp_path):
    """A .pt2 of plain weights and a TorchScript archive of core operators load and run without --trust."""
    path = getattr(corpus, which)
    out = tmp_path / f"out{path.suffix}"
    result = cli(*command_args(command, path, corpus, out))
    assert result.exit_code == 0, result.output
    assert command != "fuse" or out.exists()


@pytest.mark.parametrize("which", ["legit_pt2", "legit_torchscript"])
def test_legitimate_files_load_through_the_api(corpus, which):
    loaded = load(getattr(corpus, which))
    assert loaded.format == ("export" if which == "legit_pt2" else "torchscript")


def test_state_dict_with_arch_needs_no_trust(corpus, tmp_path, in_root):
    path = hostile.legit_state_dict(tmp_path)
    arch = f"{hostile.__name__}:tiny_net"
    result = cli("fuse", path, "--arch", arch, *SHAPE, "-o", tmp_path / "out.pt2")
    assert result.exit_code == 0, result.output


# -- a checkout's pyproject.toml is code when it names code ---------------------------------------------------------
def test_config_arch_is_code(tmp_path, monkeypatch, isolated_imports):
    project = hostile.project(tmp_path, arch=True)
    monkeypatch.chdir(tmp_path)
    result = cli("verify")
    assert not project.arch_marker.exists(), "the config's arch ran without --trust"
    assert_refused(result)


def test_config_arch_is_code_with_explicit_config(tmp_path, monkeypatch, isolated_imports):
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    project = hostile.project(checkout, arch=True)
    monkeypatch.chdir(tmp_path)
    result = cli("verify", "--config", project.pyproject)
    assert not project.arch_marker.exists(), "the config's arch ran without --trust"
    assert_refused(result)


def test_config_data_is_code(tmp_path, monkeypatch, isolated_imports):
    """``data = "module:function"`` in the config, for a model that needs no code at all (a .pt2)."""
    project = hostile.project(tmp_path, model="pt2", arch=False, data=True)
    monkeypatch.chdir(tmp_path)
    result = cli("verify")
    assert not project.data_marker.exists(), "the config's data function ran without --trust"
    assert_refused(result)


def test_config_code_runs_with_trust(tmp_path, monkeypatch, isolated_imports):
    project = hostile.project(tmp_path, arch=True, data=True)
    monkeypatch.chdir(tmp_path)
    result = cli("verify", "--trust")
    assert result.exit_code in (0, 1), result.output
    assert project.arch_marker.exists() and project.data_marker.exists()


def test_config_without_code_needs_no_trust(tmp_path, monkeypatch, isolated_imports):
    project = hostile.project(tmp_path, model="pt2", arch=False)
    monkeypatch.chdir(tmp_path)
    result = cli("verify")
    assert result.exit_code == 0, result.output
    assert not project.arch_marker.exists() and not project.data_marker.exists()


@pytest.mark.parametrize("setting", ["trust = true", "trust-pickle = true", "\n[tool.bnfold]\ntrust = true",
                                     "\n[tool.bnfold]\ntrust-pickle = true"],
                         ids=["model-trust", "model-trust-pickle", "defaults-trust", "defaults-trust-pickle"])
def test_config_cannot_grant_trust(tmp_path, monkeypatch, isolated_imports, setting):
    """A config that sets trust would let any checkout trust itself: an error that names the --trust flag."""
    hostile.project(tmp_path, model="pt2", arch=False, extra_toml=setting + "\n")
    monkeypatch.chdir(tmp_path)
    result = cli("verify")
    assert_clean_failure(result)
    assert TRUST_FLAG.search(result.output), result.output


def test_command_line_arch_and_data_are_consent(tmp_path, monkeypatch, isolated_imports):
    """--arch and --data module:function typed by the user import their code without --trust."""
    project = hostile.project(tmp_path, arch=False)
    monkeypatch.chdir(tmp_path)
    result = cli("verify", tmp_path / "model.safetensors", "--arch", f"{project.arch_module}:build", *SHAPE,
                 "--data", f"{project.data_module}:batches", "--skip", "onnx")
    assert result.exit_code in (0, 1), result.output
    assert project.arch_marker.exists() and project.data_marker.exists()


# -- zip bombs: refused from the declared sizes, before anything is inflated --------------------------------------------
_BOMB_PROBE = textwrap.dedent("""\
    import json, re, resource, sys, time
    from click.testing import CliRunner
    import bnfold.cli, bnfold.load, torch.export  # imported before measuring

    def reset_peak():
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # Linux >= 4.0: VmHWM (the peak RSS) restarts from the current RSS
        except OSError:
            pass  # then the peak only grows: a bomb that got through can hide a later one (never the first)

    def peak_mib():
        try:
            with open("/proc/self/status") as f:
                return int(re.search(r"VmHWM:\\s+(\\d+)", f.read()).group(1)) / 1024
        except (OSError, AttributeError):
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux

    runs = {}
    for name, path in json.loads(sys.argv[1]).items():
        reset_peak()
        before, start = peak_mib(), time.perf_counter()
        result = CliRunner().invoke(bnfold.cli.main, ["fuse", path, "-o", path + ".out", "--input-shape", "2,1,8,8"])
        runs[name] = {"exit_code": result.exit_code, "output": result.output,
                      "seconds": time.perf_counter() - start, "peak_growth_mib": peak_mib() - before}
    print(json.dumps(runs))
    """)
MAX_PEAK_GROWTH_MIB = 100  # a bomb inflates 300 MiB; refusing from the central directory costs next to nothing


@pytest.fixture(scope="module")
def bomb_runs(corpus):
    """Every bomb through ``bnfold fuse``, one after the other in one child process (importing torch once),
    the peak RSS reset before each."""
    paths = json.dumps({name: str(path) for name, path in corpus.bombs.items()})
    child = subprocess.run([sys.executable, "-c", _BOMB_PROBE, paths], cwd=ROOT, capture_output=True, text=True,
                           timeout=600, check=False)
    assert child.returncode == 0, child.stderr[-3000:]
    return json.loads(child.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("bomb", ["pt2_weight", "torch_save", "torchscript", "pt2_nested", "declared_total"])
def test_zip_bomb_is_refused_without_inflating_it(bomb, bomb_runs, corpus):
    run = bomb_runs[bomb]
    assert run["peak_growth_mib"] < MAX_PEAK_GROWTH_MIB, f"inflated it: {run}"
    assert run["seconds"] < 10, run
    assert run["exit_code"] == 2, run["output"]
    output = run["output"]
    assert output.startswith("error: ") and "Traceback" not in output and "please report" not in output, output
    error = output.splitlines()[0].replace(str(corpus.bombs[bomb]), "FILE")  # the file names say "bomb"
    assert re.search(r"ratio|limit|bomb|compress", error), output
    assert not corpus.bombs[bomb].with_name(corpus.bombs[bomb].name + ".out").exists()


# -- the corpus is real ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("attack", hostile.ALL_ATTACKS, indirect=True)
def test_attack_fires_under_plain_torch(attack):
    """Without this, a refusal test passes vacuously. A failure here means torch closed the hole (or the builder
    broke): rebuild the attack against the new torch, or drop it."""
    assert hostile.plain_torch_fires(attack), f"{attack.name} no longer runs under plain torch {hostile.torch.__version__}"
    attack.arm()
