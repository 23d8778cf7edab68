"""``[tool.bnfold]`` in pyproject.toml: the models ``bnfold verify`` checks in CI.

```toml
[tool.bnfold]
disable = ["BN011"]                 # defaults for every model (any key below)

[[tool.bnfold.models]]
path = "models/checkpoints/resnet_digits.safetensors"   # relative to pyproject.toml
arch = "models.zoo:resnet_digits"                        # imported from pyproject.toml's folder
arch-kwargs = { num_classes = 10 }
input-shapes = ["8,1,8,8"]
# optional: onnx = "model.onnx", exporter = "dynamo", checks = ["audit", "fold", "onnx"],
#           atol = 1e-5, rtol = 1e-4, seed = 0, timeout = 300, name = "digits", data = "calib.npz"
```

Every value is checked by type (a message names the key and the type it needs); unknown keys are rejected
with the nearest valid one. Paths, ``arch`` and ``data = "module:function"`` resolve against the folder of
pyproject.toml, wherever bnfold is run from.

The config is code where it names code: ``arch`` and ``data = "module:function"`` are imported and run, so a
config that names code is refused unless the command line says ``--trust``. A config cannot grant trust
itself (``trust``/``trust-pickle`` keys are refused): a pull request can edit pyproject.toml.
"""

from __future__ import annotations

import difflib
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bnfold.compare import check_tolerance
from bnfold.errors import BnfoldError, InputSpecError
from bnfold.findings import CHECK_GROUPS, CODES
from bnfold.inputs import InputSpec, parse_input_spec
from bnfold.onnx.export import EXPORTERS
from bnfold.onnx.runner import check_timeout

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

TRUST_NOTE = ("a config cannot grant trust, since a pull request can edit it: if you trust this checkout, pass --trust "
              "on the command line (README: Security)")


class ConfigError(BnfoldError):
    """pyproject.toml's [tool.bnfold] is missing or malformed."""


@dataclass
class ModelConfig:
    path: Path
    name: str
    arch: str | None = None
    arch_kwargs: str | None = None
    input_specs: list[InputSpec] = field(default_factory=list)
    onnx: Path | None = None
    exporter: str = "torchscript"
    checks: tuple[str, ...] = CHECK_GROUPS
    disable: tuple[str, ...] = ()
    atol: float | None = None
    rtol: float | None = None
    trust: bool = False
    seed: int = 0
    data: str | None = None  # calibration inputs for the stale-statistics check (BN013)
    timeout: float | None = None  # seconds per onnxruntime call
    root: Path | None = None  # where arch and data modules are imported from (pyproject.toml's folder)


# -- value checkers: each returns the value converted, or raises TypeError naming what it needed -----------
def _string(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise TypeError("a non-empty string")
    return value


def _strings(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise TypeError('a list of strings (e.g. ["a", "b"]; a single string is not a list)')
    return tuple(value)


def _tolerance(value: Any) -> float:
    try:
        return check_tolerance("value", value)
    except InputSpecError:
        raise TypeError("a finite number >= 0") from None


def _timeout(value: Any) -> float:
    try:
        return check_timeout(value)
    except BnfoldError:
        raise TypeError("a number > 0") from None


def _integer(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError("an integer")
    return value


def _table_or_json(value: Any) -> str:
    if isinstance(value, dict):
        return json.dumps(value)
    if isinstance(value, str):
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            parsed = None
        if isinstance(parsed, dict):
            return value
    raise TypeError("a table (arch-kwargs = { num_classes = 10 }) or a JSON object string")


def _choice(choices: tuple[str, ...]) -> Callable[[Any], str]:
    def check(value: Any) -> str:
        if value not in choices:
            raise TypeError(f"one of {', '.join(repr(c) for c in choices)}")
        return value
    return check


def _subset(choices: tuple[str, ...]) -> Callable[[Any], tuple[str, ...]]:
    def check(value: Any) -> tuple[str, ...]:
        items = _strings(value)
        bad = [v for v in items if v not in choices]
        if bad:
            raise TypeError(f"a list of {', '.join(repr(c) for c in choices)} (got {bad[0]!r}"
                            + _nearest_suffix(bad[0], choices) + ")")
        return items
    return check


#: Every key, with its checker. One table: validation, the unknown-key message and the docs come from it.
_KEYS: dict[str, Callable[[Any], Any]] = {
    "path": _string, "name": _string, "arch": _string, "arch-kwargs": _table_or_json,
    "input-shapes": _strings, "onnx": _string, "exporter": _choice(EXPORTERS), "checks": _subset(CHECK_GROUPS),
    "disable": _subset(tuple(CODES)), "atol": _tolerance, "rtol": _tolerance, "seed": _integer, "data": _string,
    "timeout": _timeout,
}
_REFUSED = {"trust", "trust-pickle"}


def _nearest_suffix(word: str, choices: Any) -> str:
    near = difflib.get_close_matches(word, list(choices), n=1)
    return f"; did you mean {near[0]!r}?" if near else ""


def find_pyproject(start: Path) -> Path:
    for folder in [start, *start.parents]:
        if (folder / "pyproject.toml").is_file():
            return folder / "pyproject.toml"
    raise ConfigError(f"no pyproject.toml in {start} or above", "pass a MODEL, or add [tool.bnfold] models to "
                      "pyproject.toml (see the README's CI recipe)")


def load_config(pyproject: Path, *, trust: bool = False) -> list[ModelConfig]:
    """The models of ``[[tool.bnfold.models]]``, each merged with the ``[tool.bnfold]`` defaults and validated.

    ``trust`` is the command line's ``--trust``: without it, a config that names code is refused.
    """
    try:
        data = tomllib.loads(pyproject.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read {pyproject}: {exc.strerror or exc}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{pyproject} is not valid TOML: {exc}") from None
    tool = data.get("tool", {})
    section = tool.get("bnfold") if isinstance(tool, dict) else None
    if section is None or (isinstance(section, dict) and "models" not in section):
        raise ConfigError(f"{pyproject} has no [[tool.bnfold.models]] entries",
                          "pass a MODEL, or list models under [[tool.bnfold.models]] (see the README)")
    if not isinstance(section, dict):
        raise ConfigError(f"{pyproject}: [tool.bnfold] must be a table")
    models = section["models"]
    if isinstance(models, dict):
        raise ConfigError(f"{pyproject}: [tool.bnfold.models] is a single table, bnfold expects a list of models",
                          "write each model under its own [[tool.bnfold.models]] header (two brackets)")
    if not isinstance(models, list) or not models or not all(isinstance(m, dict) for m in models):
        raise ConfigError(f"{pyproject}: tool.bnfold.models must be a non-empty list of tables",
                          "write each model under its own [[tool.bnfold.models]] header")
    defaults = _validate({k: v for k, v in section.items() if k != "models"}, f"{pyproject} [tool.bnfold]")
    configs = []
    for index, entry in enumerate(models):
        where = f"{pyproject} [[tool.bnfold.models]] #{index + 1}"
        merged = {**defaults, **_validate(entry, where)}
        configs.append(_model(pyproject.parent.resolve(), merged, where, trust))
    return configs


def _validate(entry: dict[str, Any], where: str) -> dict[str, Any]:
    """Check every key of ``entry`` and return the converted values."""
    converted = {}
    for key, value in entry.items():
        if key in _REFUSED:
            raise ConfigError(f"{where}: {key} = {value!r} is not allowed in the config", TRUST_NOTE)
        if key not in _KEYS:
            raise ConfigError(f"{where}: unknown key {key!r}" + _nearest_suffix(key, _KEYS),
                              f"known keys: {', '.join(_KEYS)}")
        try:
            converted[key] = _KEYS[key](value)
        except TypeError as exc:
            raise ConfigError(f"{where}: {key} must be {exc}, got {value!r} ({_toml_type(value)})") from None
    return converted


def _toml_type(value: Any) -> str:
    names = {bool: "boolean", int: "integer", float: "float", str: "string", list: "array", dict: "table"}
    return names.get(type(value), type(value).__name__)


def _is_callable_spec(data: str, root: Path) -> bool:
    """``module:function`` rather than a path (a path that exists wins, as on the command line)."""
    return ":" in data and not (root / data).exists()


def _model(root: Path, entry: dict[str, Any], where: str, trust: bool) -> ModelConfig:
    if "path" not in entry:
        raise ConfigError(f"{where}: 'path' is missing",
                          "e.g. path = \"models/model.pt2\" (relative to pyproject.toml)")
    data = entry.get("data")
    code = [f"arch = {entry['arch']!r}"] if "arch" in entry else []
    if data is not None and _is_callable_spec(data, root):
        code.append(f"data = {data!r}")
    if code and not trust:
        raise ConfigError(f"{where}: {' and '.join(code)} names code that bnfold would import and run", TRUST_NOTE)
    try:
        specs = [parse_input_spec(s) for s in entry.get("input-shapes", ())]
    except InputSpecError as exc:
        raise ConfigError(f"{where}: input-shapes: {exc.message}") from None
    return ModelConfig(
        path=root / entry["path"],
        name=entry.get("name", entry["path"]),
        arch=entry.get("arch"),
        arch_kwargs=entry.get("arch-kwargs"),
        input_specs=specs,
        onnx=root / entry["onnx"] if "onnx" in entry else None,
        exporter=entry.get("exporter", "torchscript"),
        checks=entry.get("checks", CHECK_GROUPS),
        disable=entry.get("disable", ()),
        atol=entry.get("atol"),
        rtol=entry.get("rtol"),
        trust=trust,
        seed=entry.get("seed", 0),
        data=(data if data is None or _is_callable_spec(data, root) else str(root / data)),
        timeout=entry.get("timeout"),
        root=root,
    )
