"""What each command was asked to do, as one typed object per command: the CLI builds it from its options, and
:mod:`bnfold.commands` carries it out. A new option is a click declaration in :mod:`bnfold.cli` and a field here
(the click parameter and the field share a name); the rendering flags (``--quiet``, ``--format``, ``--timings``)
stay with the CLI.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from bnfold.compare import check_tolerance
from bnfold.inputs import InputSpec, parse_input_spec

#: Progress: ``with progress("folding"):`` shows what runs (a spinner in the CLI, nothing for a library caller).
Progress = Callable[[str], AbstractContextManager[Any]]


def no_progress(message: str) -> AbstractContextManager[Any]:
    return contextlib.nullcontext()


@dataclass(frozen=True)
class ModelSource:
    """MODEL and how to read it (``--input-shape``, ``--arch``, ``--arch-kwargs``, ``--trust``)."""

    model_path: Path
    input_shapes: tuple[str, ...] = ()
    arch: str | None = None
    arch_kwargs: str | None = None
    trust: bool = False

    def specs(self) -> list[InputSpec]:
        return [parse_input_spec(s) for s in self.input_shapes]


@dataclass(frozen=True)
class Comparing:
    """How outputs are compared: tolerances (None: per dtype) and the seed of the random inputs."""

    atol: float | None = None
    rtol: float | None = None
    seed: int = 0

    def check(self) -> None:
        check_tolerance("--atol", self.atol)
        check_tolerance("--rtol", self.rtol)


@dataclass(frozen=True)
class FuseOptions:
    model: ModelSource
    compare: Comparing = Comparing()
    output: Path | None = None
    keep_structure: bool = False
    discovery: str = "auto"
    external_data: bool = False
    timeout: float | None = None
    json_path: Path | None = None


@dataclass(frozen=True)
class ExportOptions:
    model: ModelSource
    compare: Comparing = Comparing()
    output: Path | None = None
    exporter: str = "dynamo"
    opset: int | None = None
    static_batch: bool = False
    fp16: bool = False
    keep_io_types: bool = False
    external_data: bool = False
    no_fold: bool = False
    force: bool = False
    timeout: float | None = None
    json_path: Path | None = None


@dataclass(frozen=True)
class VerifyOptions:
    """One MODEL (``model``), or the models of a pyproject.toml (``model=None``; ``config_path`` or the nearest
    one). Values given here win over the config's."""

    model: ModelSource | None
    compare: Comparing = Comparing()
    onnx_path: Path | None = None
    exporter: str = "torchscript"
    skip_checks: tuple[str, ...] = ()
    disable: str | None = None
    timeout: float | None = None
    data_spec: str | None = None
    config_path: Path | None = None
    json_path: Path | None = None
    junit_path: Path | None = None
    jobs: int = 1
    trust: bool = False  # for the config's models (a config cannot grant trust itself)

    def disabled(self) -> tuple[str, ...]:
        return tuple(c.strip().upper() for c in (self.disable or "").split(",") if c.strip())


@dataclass(frozen=True)
class InspectOptions:
    model: ModelSource
    data_spec: str | None = None
    json_path: Path | None = None
    plot_path: Path | None = None


@dataclass(frozen=True)
class RecalibrateOptions:
    model: ModelSource
    data_spec: str
    output: Path | None = None
    samples: int | None = None
    batch_size: int = 64
    method: str = "layerwise"
    json_path: Path | None = None


Options = TypeVar("Options")


def from_cli(cls: type[Options], values: dict[str, Any]) -> Options:
    """``cls`` from click's parameters: MODEL's fields go into a :class:`ModelSource` (none without MODEL), the
    tolerances and seed into :class:`Comparing`, the rest by name."""
    values = dict(values)
    source = {f.name: values.pop(f.name) for f in dataclasses.fields(ModelSource) if f.name in values}
    comparing = {f.name: values.pop(f.name) for f in dataclasses.fields(Comparing) if f.name in values}
    fields = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    if "trust" in fields:
        values["trust"] = source.get("trust", False)
    model = ModelSource(**source) if source.get("model_path") is not None else None
    extra = {"compare": Comparing(**comparing)} if "compare" in fields else {}
    return cls(model=model, **extra, **values)  # type: ignore[call-arg]
