"""The ``bnfold`` console script: a Ctrl-C or SIGTERM while torch is still importing exits quietly too.

``import bnfold`` is light (its public names load on first use), so this runs before the slow imports and can
handle the signals that arrive during them; the commands then take over (``bnfold.cli._exit_through``).

A signal during the imports is noted and acted on once they finish (a second or two later), not raised where it
lands: a KeyboardInterrupt inside a C extension's import (numpy, ml_dtypes) leaves the module half-initialised,
and the next import then fails with a RecursionError traceback instead of exiting.
"""

from __future__ import annotations

import signal
import sys


def main() -> None:
    received: list[int] = []

    def note(signum: int, frame: object) -> None:
        received.append(signum)

    previous = {signum: signal.signal(signum, note) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        from bnfold.cli import main as cli
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if received:
        _quit(received[0])
    cli(prog_name="bnfold")


def _quit(signum: int) -> None:
    print("error: interrupted while starting: nothing was done", file=sys.stderr)
    sys.exit(128 + signum)
