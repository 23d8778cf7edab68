"""Export a PyTorch model to ONNX: the caller owns the path; nothing the exporters print reaches the terminal.

The default exporter is the TorchScript one (``dynamo=False``): it takes a fraction of a second where the
torch.export-based exporter takes seconds even for a tiny model, which matters for a CI gate run on every
commit. ``exporter="dynamo"`` selects the other (it needs onnxscript). Either way the model is exported
from its eval copy: the torch.export-based exporter bakes the current mode into the graph.
"""

from __future__ import annotations

import contextlib
import ctypes
import io
import logging
import os
import sys
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bnfold.compare import flatten_outputs

EXPORTERS = ("torchscript", "dynamo")
#: Lines of the exporter's own printout kept on its exception (the IR graph it dumps runs to hundreds).
EXPORT_OUTPUT_TAIL = 20
_log = logging.getLogger(__name__)


@dataclass
class CapturedOutput:
    """What was printed while captured; ``text`` is filled in when the capture ends."""

    text: str = ""

    def tail(self, lines: int = EXPORT_OUTPUT_TAIL) -> str:
        return "\n".join(self.text.strip().splitlines()[-lines:])


def _flush_all() -> None:
    """Flush Python's and C's stdio buffers, so that text written before a file-descriptor switch goes where it
    was meant to (C++ code writes through C stdio, which buffers fully when stdout is not a terminal)."""
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        with contextlib.suppress(Exception):  # a replaced or closed stream has nothing to flush
            stream.flush()
    with contextlib.suppress(Exception):  # no C library to ask (Windows): Python's own flushes are all there is
        ctypes.CDLL(None).fflush(None)


@contextlib.contextmanager
def captured_output() -> Iterator[CapturedOutput]:
    """Send everything printed to stdout and stderr, by Python or by C/C++ code, to a temporary file.

    ``contextlib.redirect_stdout`` only swaps ``sys.stdout``; the TorchScript exporter prints its whole IR graph
    from C++ straight to file descriptor 1 when it fails, so the descriptors themselves are redirected (and
    restored, whatever happens). The switch is process-wide: other threads' output is captured meanwhile too.
    """
    captured = CapturedOutput()
    python_text = io.StringIO()
    _flush_all()
    with tempfile.TemporaryFile() as sink:
        saved = {}
        for fd in (1, 2):
            with contextlib.suppress(OSError):  # a closed descriptor (a daemon's) has nothing to protect
                saved[fd] = os.dup(fd)
        try:
            for fd in saved:
                os.dup2(sink.fileno(), fd)
            with contextlib.redirect_stdout(python_text), contextlib.redirect_stderr(python_text):
                yield captured
        finally:
            _flush_all()
            for fd, copy in saved.items():
                os.dup2(copy, fd)
                os.close(copy)
            sink.seek(0)
            captured.text = python_text.getvalue() + sink.read().decode(errors="replace")


def export_onnx(model: Any, inputs: tuple[torch.Tensor, ...], outputs: Any, path: Path,
                exporter: str = "torchscript", *, opset: int | None = None, dynamic_batch: bool = True) -> None:
    """Export ``model`` (already in eval mode) to ``path``, with a symbolic batch axis on every input and output
    unless ``dynamic_batch`` is False.

    ``outputs`` is the model's output on ``inputs`` (the caller has it already; it names the ONNX outputs).
    A ``torch.export`` program is translated as it is (its own shapes, dynamic or not), by the dynamo exporter.
    Nothing the exporters print reaches the terminal: it is logged at debug level, and on failure its last
    lines are added to the exception as a note.
    """
    output = CapturedOutput()
    try:
        with captured_output() as output, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _export(model, inputs, len(flatten_outputs(outputs)), path, exporter, opset, dynamic_batch)
    except Exception as exc:
        if hasattr(exc, "add_note") and output.text.strip():  # Python 3.11+
            exc.add_note(f"the exporter printed (last {EXPORT_OUTPUT_TAIL} lines):\n{output.tail()}")
        raise
    finally:
        if output.text.strip():
            _log.debug("%s exporter output:\n%s", exporter, output.text)


def _export(model: Any, inputs: tuple[torch.Tensor, ...], n_outputs: int, path: Path, exporter: str,
            opset: int | None, dynamic_batch: bool) -> None:
    names = {"input_names": [f"input_{i}" for i in range(len(inputs))],
             "output_names": [f"output_{i}" for i in range(n_outputs)]}
    if opset is not None:
        names["opset_version"] = opset
    if isinstance(model, torch.export.ExportedProgram):
        torch.onnx.export(model, inputs, str(path), dynamo=True, **names)
    elif exporter == "dynamo":
        batch = torch.export.Dim.AUTO if hasattr(torch.export.Dim, "AUTO") else torch.export.Dim("batch")
        shapes = tuple({0: batch} for _ in inputs) if dynamic_batch else None
        torch.onnx.export(model, inputs, str(path), dynamo=True, dynamic_shapes=shapes, **names)
    else:
        axes = {name: {0: "batch"} for name in names["input_names"] + names["output_names"]} if dynamic_batch else None
        torch.onnx.export(model, inputs, str(path), dynamo=False, dynamic_axes=axes, **names)
