"""Process signals as exceptions, so that ``finally`` blocks remove temp files and child processes.

SIGINT already raises ``KeyboardInterrupt``; :func:`handle_signals` makes SIGTERM (``timeout``, CI
cancellation) raise :class:`Terminated` while a command runs. The CLI turns both into exit codes 130 and 143;
``bnfold verify -j`` workers use the same handler, so an interrupted worker unwinds like the main process.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator
from typing import Any


class Terminated(BaseException):
    """SIGTERM as an exception.

    A BaseException, like KeyboardInterrupt, so that ``except Exception`` in library code cannot swallow it.
    """


@contextlib.contextmanager
def handle_signals() -> Iterator[None]:
    """While the block runs, SIGTERM raises :class:`Terminated` (SIGINT already raises KeyboardInterrupt)."""
    def terminate(signum: int, frame: Any) -> None:
        raise Terminated(signum)

    try:
        previous = signal.signal(signal.SIGTERM, terminate)
    except ValueError:  # not the main thread (an embedding application): leave its signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
