"""The ``bnfold`` console script: a Ctrl-C or SIGTERM while torch is still importing exits quietly too.

``import bnfold`` is light (its public names load on first use), so this runs before the slow imports and can
handle the signals that arrive during them; the commands then take over (``bnfold.cli._exit_through``).
"""

from __future__ import annotations

import signal
import sys


class _Terminated(BaseException):
    """SIGTERM during start-up, as an exception (like KeyboardInterrupt for SIGINT)."""


def main() -> None:
    def terminate(signum: int, frame: object) -> None:
        raise _Terminated

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        from bnfold.cli import main as cli
    except KeyboardInterrupt:
        _quit(signal.SIGINT)
    except _Terminated:
        _quit(signal.SIGTERM)
    finally:
        signal.signal(signal.SIGTERM, previous)
    cli(prog_name="bnfold")


def _quit(signum: int) -> None:
    print("error: interrupted while starting: nothing was done", file=sys.stderr)
    sys.exit(128 + signum)
