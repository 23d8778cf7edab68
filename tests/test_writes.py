"""Writing a file (bnfold.save): atomic replacement, file modes, write failures (full disk, size limits), and no
temporary file left behind.

Write failures are provoked with ``RLIMIT_FSIZE`` (what ``ulimit -f`` sets) in a child process, so the limit
never touches pytest: with SIGXFSZ ignored, a write past the limit fails with EFBIG, the same path through
the code as ENOSPC on a full disk. (A signal in the middle of a write: ``test_signals.py``.)
"""

from __future__ import annotations

import errno
import json
import os
import stat
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from bnfold import save
from bnfold.errors import OutputError
from bnfold.save import current_umask, save_model, write_atomic, write_bytes_atomic
from tests.conftest import OLD, temp_files
from tests.processes import run_child

FORMATS = ["torchscript", "export", "pickle", "state_dict", "safetensors"]


SIZE_LIMIT = 4096  # bytes: far below every model file written here (the Linear alone holds 16 KiB)


#: Prepended to every child script: the limit that makes writes past SIZE_LIMIT fail with EFBIG.
LIMIT_FILE_SIZE = f"""
import resource, signal
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel kills the process at the limit
resource.setrlimit(resource.RLIMIT_FSIZE, ({SIZE_LIMIT}, {SIZE_LIMIT}))
"""


def tiny_model() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 64), nn.BatchNorm1d(64)).eval()


def tiny_model_as(fmt: str) -> nn.Module:
    model = tiny_model()
    return torch.jit.script(model) if fmt == "torchscript" else model


EXAMPLE_INPUTS = (torch.randn(2, 64),)


def mlp_tiny_state() -> dict[str, torch.Tensor]:
    """A checkpoint for ``--arch models.zoo:mlp_tiny`` (input 2,32), the smallest model of the zoo."""
    from models import zoo

    return zoo.build("mlp_tiny").state_dict()


@pytest.fixture
def umask():
    """Set the process umask for one test and restore it afterwards."""
    old = os.umask(0o022)
    os.umask(old)
    yield lambda value: os.umask(value)
    os.umask(old)


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# -- file modes ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002, 0o277], ids=oct)
def test_new_files_get_the_mode_open_would_give(tmp_path, umask, mask):
    umask(mask)
    with open(tmp_path / "plain.txt", "w"):
        pass
    expected = mode_of(tmp_path / "plain.txt")
    assert expected == 0o666 & ~mask
    write_atomic(tmp_path / "report.json", lambda p: Path(p).write_text("{}"))
    save_model(tiny_model(), "state_dict", tmp_path / "model.pt")
    assert (oct(mode_of(tmp_path / "report.json")), oct(mode_of(tmp_path / "model.pt"))) == (oct(expected),) * 2


@pytest.mark.parametrize("existing_mode", [0o644, 0o640, 0o444], ids=oct)
def test_a_replaced_file_keeps_its_mode(tmp_path, umask, existing_mode):
    umask(0o077)  # a new file would get 0o600: the mode must come from the replaced file
    target = tmp_path / "model.pt"
    target.write_bytes(OLD)
    target.chmod(existing_mode)
    save_model(tiny_model(), "state_dict", target)
    assert oct(mode_of(target)) == oct(existing_mode)
    assert target.read_bytes() != OLD


@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_umask_read_without_proc_leaves_it_unchanged(monkeypatch, umask, mask):
    umask(mask)

    def no_proc(*args, **kwargs):
        raise FileNotFoundError(errno.ENOENT, "no /proc here")

    monkeypatch.setattr(save, "open", no_proc, raising=False)  # shadows the builtin inside bnfold.save only
    assert current_umask() == mask
    monkeypatch.undo()
    assert current_umask() == mask  # /proc agrees, and the fallback restored the umask


# -- write failures ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def size_limited_writes(tmp_path_factory):
    """One child writes every format, and a text file, past the size limit; returns what happened to each.

    Each target exists beforehand with OLD content. One child for all formats: importing torch dominates.
    """
    folder = tmp_path_factory.mktemp("size-limited")
    script = """
        import json, sys
        from pathlib import Path
        import torch
        from tests.conftest import OLD
        from tests.test_writes import EXAMPLE_INPUTS, FORMATS, tiny_model_as
        from bnfold.errors import OutputError
        from bnfold.save import save_model, write_atomic
        folder = Path(sys.argv[1])
        jobs = {fmt: (lambda fmt=fmt, model=tiny_model_as(fmt): save_model(model, fmt, folder / fmt,
                                                                           EXAMPLE_INPUTS)) for fmt in FORMATS}
        jobs["text"] = lambda: write_atomic(folder / "text", lambda p: Path(p).write_text("x" * 100_000))
        for name in jobs:
            (folder / name).write_bytes(OLD)
        """ + textwrap.indent(LIMIT_FILE_SIZE, " " * 8) + """
        results = {}
        for name, job in jobs.items():
            try:
                job()
                results[name] = "written"
            except OutputError as exc:
                results[name] = f"OutputError: {exc.message}"
            except BaseException as exc:
                results[name] = f"{type(exc).__name__}: {exc}"
        print(json.dumps(results))
        """
    child = run_child(script, str(folder))
    assert child.returncode == 0, child.stderr[-3000:]
    return folder, json.loads(child.stdout.splitlines()[-1])


@pytest.mark.parametrize("name", [*FORMATS, "text"])
def test_a_size_limit_becomes_an_output_error(size_limited_writes, name):
    folder, results = size_limited_writes
    assert results[name] == f"OutputError: cannot write {folder / name}: File too large"
    assert (folder / name).read_bytes() == OLD  # the previous file is untouched
    assert temp_files(folder) == []


def test_cli_reports_a_size_limit_in_one_line(tmp_path):
    checkpoint, out = tmp_path / "ckpt.pt", tmp_path / "out.pt2"
    torch.save(mlp_tiny_state(), checkpoint)
    script = LIMIT_FILE_SIZE + "from bnfold.cli import main\nmain()\n"
    child = run_child(script, "fuse", str(checkpoint), "--arch", "models.zoo:mlp_tiny", "--input-shape", "2,32",
                      "-o", str(out))
    assert child.returncode == 2, child.stdout + child.stderr
    errors = [line for line in child.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: cannot write {out}: File too large"], child.stderr
    assert "Traceback" not in child.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]


@pytest.mark.parametrize(("code", "reason"), [(errno.ENOSPC, "No space left on device"),
                                              (errno.EDQUOT, "Disk quota exceeded"),
                                              (errno.EACCES, "Permission denied")])
def test_os_errors_become_output_errors_with_the_reason_and_a_hint(tmp_path, code, reason):
    target = tmp_path / "report.json"
    target.write_bytes(OLD)

    def fail(tmp: str) -> None:
        Path(tmp).write_text("partial")
        raise OSError(code, os.strerror(code), tmp)

    with pytest.raises(OutputError) as info:
        write_atomic(target, fail)
    assert info.value.message == f"cannot write {target}: {reason}"
    assert info.value.hint
    assert target.read_bytes() == OLD and temp_files(tmp_path) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes to read-only folders")
def test_read_only_folder(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir(mode=0o500)
    with pytest.raises(OutputError, match="cannot write .*: Permission denied"):
        write_bytes_atomic(folder / "x.bin", b"data")


def test_missing_folders_are_created_and_a_failed_write_leaves_none(tmp_path):
    """Issue 15: missing parent folders are created, as export tools do (this refused before); a write that
    fails removes the folders it created; a file where a folder should be is refused."""
    write_bytes_atomic(tmp_path / "new" / "deeper" / "x.bin", b"data")
    assert (tmp_path / "new" / "deeper" / "x.bin").read_bytes() == b"data"

    def full_disk(path: str) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(OutputError, match="No space left"):
        write_atomic(tmp_path / "gone" / "again" / "x.bin", full_disk)
    assert not (tmp_path / "gone").exists()
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(OutputError, match="file is not a folder"):
        write_bytes_atomic(tmp_path / "file" / "x.bin", b"data")


def test_unknown_format_writes_nothing(tmp_path):
    with pytest.raises(ValueError, match="unknown output format 'onnx'"):
        save_model(tiny_model(), "onnx", tmp_path / "x.onnx")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_round_trips_through_memory(tmp_path, fmt):
    model, path = tiny_model_as(fmt), tmp_path / f"model.{fmt}"
    assert save_model(model, fmt, path, EXAMPLE_INPUTS) == fmt
    x = EXAMPLE_INPUTS[0]
    if fmt == "torchscript":
        loaded = torch.jit.load(str(path))
    elif fmt == "export":
        loaded = torch.export.load(str(path)).module()
    elif fmt == "pickle":
        loaded = torch.load(path, weights_only=False)
    else:
        loaded = tiny_model()
        if fmt == "safetensors":
            from safetensors.torch import load_file

            loaded.load_state_dict(load_file(str(path)))
        else:
            loaded.load_state_dict(torch.load(path, weights_only=True))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    assert temp_files(tmp_path) == []


# -- temporary files on interruption -------------------------------------------------------------------------------
@pytest.mark.parametrize("exc", [KeyboardInterrupt(), SystemExit(143), RuntimeError("serialiser failed")],
                         ids=lambda e: type(e).__name__)
def test_an_interrupted_write_leaves_no_temp_file(tmp_path, exc):
    target = tmp_path / "model.pt2"
    target.write_bytes(OLD)
    seen = []

    def interrupted(tmp: str) -> None:
        seen.append(Path(tmp).name)
        Path(tmp).write_bytes(b"half a model")
        raise exc

    with pytest.raises(type(exc)):
        write_atomic(target, interrupted)
    assert seen[0].startswith(".model.pt2.") and seen[0].endswith(".tmp.pt2")  # .<name>.XXXX.tmp<suffix>
    assert target.read_bytes() == OLD and temp_files(tmp_path) == []
