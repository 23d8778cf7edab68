"""The command line itself: --debug shows the traceback, --help names every finding code, file names are printed as
they are."""

from __future__ import annotations

import shutil

from bnfold.findings import CODES
from tests.cli_helpers import SHAPE, cli, run


def test_debug_shows_the_traceback(tmp_path):
    bad = tmp_path / "noise.bin"
    bad.write_bytes(b"\x00" * 64)
    result = run(str(bad), *SHAPE, "--debug")
    assert result.exit_code != 0 and result.exception is not None and not isinstance(result.exception, SystemExit)


def test_help_names_every_code():
    result = cli("verify", "--help")
    assert f"BN001-{max(CODES)}" in result.output


def test_file_names_are_printed_as_they_are(tmp_path, program):
    odd = tmp_path / "a:x:[bold]b.pt2"
    shutil.copy(program, odd)
    result = cli("fuse", str(odd), "-o", str(tmp_path / "out.pt2"))
    assert result.exit_code == 0, result.output
    assert "a:x:[bold]b.pt2" in result.output and "\u274c" not in result.output
