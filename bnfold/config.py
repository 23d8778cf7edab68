"""``[tool.bnfold]`` in pyproject.toml: the models ``bnfold verify`` checks in CI.

```toml
[tool.bnfold]
disable = ["BN011"]                 # defaults for every model (any key below)

[[tool.bnfold.models]]
path = "models/checkpoints/resnet_digits.safetensors"   # relative to pyproject.toml
arch = "models.zoo:resnet_digits"
arch-kwargs = { num_classes = 10 }
input-shapes = ["8,1,8,8"]
# optional: onnx = "model.onnx", exporter = "dynamo", checks = ["audit", "fold", "onnx"],
#           atol = 1e-5, rtol = 1e-4, trust-pickle = false, name = "digits"
```
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bnfold.errors import BnfoldError
from bnfold.findings import CODES
from bnfold.inputs import InputSpec, parse_input_spec

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

_KEYS = {"path", "name", "arch", "arch-kwargs", "input-shapes", "onnx", "exporter", "checks", "disable", "atol",
         "rtol", "trust-pickle", "seed", "data"}


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
    checks: tuple[str, ...] = ("audit", "fold", "onnx")
    disable: tuple[str, ...] = ()
    atol: float | None = None
    rtol: float | None = None
    trust_pickle: bool = False
    seed: int = 0
    data: str | None = None  # calibration inputs for the stale-statistics check (BN013)


def find_pyproject(start: Path) -> Path:
    for folder in [start, *start.parents]:
        if (folder / "pyproject.toml").is_file():
            return folder / "pyproject.toml"
    raise ConfigError(f"no pyproject.toml in {start} or above", "pass a MODEL, or add [tool.bnfold] models to "
                      "pyproject.toml (see the README's CI recipe)")


def load_config(pyproject: Path) -> list[ModelConfig]:
    try:
        data = tomllib.loads(pyproject.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read {pyproject}: {exc}") from None
    section = data.get("tool", {}).get("bnfold")
    if not isinstance(section, dict) or not section.get("models"):
        raise ConfigError(f"{pyproject} has no [[tool.bnfold.models]] entries",
                          "pass a MODEL, or list models under [[tool.bnfold.models]] (see the README)")
    defaults = {k: v for k, v in section.items() if k != "models"}
    return [_model(pyproject, {**defaults, **entry}, i) for i, entry in enumerate(section["models"])]


def _model(pyproject: Path, entry: dict[str, Any], index: int) -> ModelConfig:
    where = f"{pyproject} [[tool.bnfold.models]] #{index + 1}"
    unknown = sorted(set(entry) - _KEYS)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}", f"known keys: {', '.join(sorted(_KEYS))}")
    if "path" not in entry:
        raise ConfigError(f"{where}: 'path' is missing")
    disable = tuple(entry.get("disable", ()))
    bad = [c for c in disable if c not in CODES]
    if bad:
        raise ConfigError(f"{where}: unknown finding code(s) in disable: {', '.join(bad)}")
    root = pyproject.parent
    kwargs = entry.get("arch-kwargs")
    return ModelConfig(
        path=root / entry["path"],
        name=entry.get("name", entry["path"]),
        arch=entry.get("arch"),
        arch_kwargs=json.dumps(kwargs) if isinstance(kwargs, dict) else kwargs,
        input_specs=[parse_input_spec(s) for s in entry.get("input-shapes", [])],
        onnx=root / entry["onnx"] if entry.get("onnx") else None,
        exporter=entry.get("exporter", "torchscript"),
        checks=tuple(entry.get("checks", ("audit", "fold", "onnx"))),
        disable=disable,
        atol=entry.get("atol"),
        rtol=entry.get("rtol"),
        trust_pickle=bool(entry.get("trust-pickle", False)),
        seed=int(entry.get("seed", 0)),
        data=str(root / entry["data"]) if entry.get("data") and ":" not in entry["data"] else entry.get("data"),
    )
