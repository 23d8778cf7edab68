"""bnfold's command line run in-process (click's CliRunner), and checks of its one-line errors (exit 2)."""

from __future__ import annotations

from click.testing import CliRunner

from bnfold.cli import main

#: ``--input-shape`` for the digits model of the ``state_dict_file`` fixture (1x8x8), batch 2.
SHAPE = ["--input-shape", "2,1,8,8"]


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def run(*args: str):
    """``bnfold fuse ARGS``."""
    return CliRunner().invoke(main, ["fuse", *args])


def assert_clean_error(result, *fragments: str) -> None:
    """Exit 2 with bnfold's own one-line message: no traceback, no "please report it" (that is for bugs)."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert "please report" not in result.output, result.output
    assert result.output.startswith("error: "), result.output
    for fragment in fragments:
        assert fragment in result.output


def assert_usage_error(result, *fragments: str) -> None:
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error: ") and "Traceback" not in result.output
    assert "please report" not in result.output
    for fragment in fragments:
        assert fragment in result.output, result.output
