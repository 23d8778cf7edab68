"""``bnfold verify -j N``: the config's models verified in N worker processes.

Each model runs in a process of its own (started with ``spawn``: a fork of a process that has run torch can
deadlock in its thread pools), at most N at a time. Reports come back in the config's order whatever order the
workers finish in, so ``-j 2`` prints what ``-j 1`` prints. A worker that dies (a segfault in a custom op, the
OOM killer) becomes that model's failed report; the others go on. A model that cannot be verified at all (a
load error: bad input) stops the run as it does without ``-j``: exit 2, naming the first such model in config
order.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import time
import traceback
from collections.abc import Callable
from typing import Any

from bnfold.errors import BnfoldError
from bnfold.signals import handle_signals
from bnfold.verify import Check, Report, verify

#: Seconds an interrupted worker gets to clean up before it is killed.
_GRACE_S = 10.0


def _worker(connection: Any, function: Callable[..., Report], kwargs: dict[str, Any]) -> None:
    """Run one verification and send back ("report", Report), ("usage", message, hint) or ("bug", text).

    SIGTERM unwinds the verification (its onnxruntime child and temp folders are cleaned up on the way out)."""
    try:
        with handle_signals():
            report = function(**kwargs)
        connection.send(("report", report))
    except BnfoldError as exc:
        connection.send(("usage", exc.message, exc.hint))
    except BaseException as exc:  # noqa: BLE001 - anything else is this model's failure, reported as such
        connection.send(("bug", f"{type(exc).__name__}: {exc}", traceback.format_exc(limit=5)))
    finally:
        connection.close()


def verify_many(jobs: list[dict[str, Any]], workers: int, function: Callable[..., Report] | None = None,
                on_done: Callable[[int], None] | None = None) -> list[Report]:
    """``function(**kwargs)`` (``bnfold.verify`` by default) for every kwargs in ``jobs``, ``workers`` at a time.

    Returns the reports in the order of ``jobs``. ``on_done(i)`` is called as each job finishes (progress).
    """
    function = function or verify
    context = multiprocessing.get_context("spawn")
    results: dict[int, tuple[Any, ...]] = {}
    running: dict[int, tuple[Any, Any]] = {}
    pending = list(range(len(jobs)))
    try:
        while pending or running:
            while pending and len(running) < max(1, workers):
                index = pending.pop(0)
                receive, send = context.Pipe(duplex=False)
                process = context.Process(target=_worker, args=(send, function, jobs[index]), daemon=True)
                process.start()
                send.close()
                running[index] = (process, receive)
            _collect(running, results, on_done)
    finally:
        _stop(running)
    return [_report(jobs[i], results[i]) for i in range(len(jobs))]


def _stop(running: dict[int, tuple[Any, Any]]) -> None:
    """Interrupted: ask every worker to stop (it removes its own children and temp folders), then make sure."""
    for process, _ in running.values():
        process.terminate()
    deadline = time.monotonic() + _GRACE_S
    for process, receive in running.values():
        process.join(max(0.0, deadline - time.monotonic()))
        if process.is_alive():
            process.kill()
            process.join()
        receive.close()


def _collect(running: dict[int, tuple[Any, Any]], results: dict[int, tuple[Any, ...]],
             on_done: Callable[[int], None] | None) -> None:
    """Wait until at least one worker has answered or died, and record it."""
    ready = multiprocessing.connection.wait([receive for _, receive in running.values()])
    for index, (process, receive) in list(running.items()):
        if receive not in ready:
            continue
        try:
            results[index] = receive.recv()
        except EOFError:  # the process died before it could answer
            process.join()
            results[index] = ("crash", process.exitcode)
        process.join()
        receive.close()
        del running[index]
        if on_done is not None:
            on_done(index)


def _report(kwargs: dict[str, Any], result: tuple[Any, ...]) -> Report:
    kind = result[0]
    if kind == "report":
        return result[1]
    name = str(kwargs.get("name") or kwargs.get("model"))
    if kind == "usage":
        raise BnfoldError(f"{name}: {result[1]}", result[2])
    if kind == "crash":
        code = result[1]
        how = f"was killed by signal {-code}" if code is not None and code < 0 else f"exited with {code}"
        detail = f"the worker process verifying it {how}"
    else:
        detail = f"verification raised {result[1]}"
    return Report(model=name, checks=[Check("run", False, detail)])
