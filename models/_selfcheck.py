"""Sanity check for the model zoo: ``python -m models._selfcheck`` from the repo root."""
from __future__ import annotations

import contextlib
import os
import sys
import time
import warnings

import torch
import torch.fx

from models.zoo import REFERENCE_MODELS, RESNET50, build


@contextlib.contextmanager
def _quiet_stderr():
    """A failing torch.export dumps the partial graph to stderr (fd 2); hide it."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def _fx_ok(model: torch.nn.Module) -> bool:
    try:
        torch.fx.symbolic_trace(model)
        return True
    except Exception:
        return False


def _export_ok(model: torch.nn.Module, x: torch.Tensor) -> bool:
    try:
        with _quiet_stderr(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.export.export(model, (x,))
        return True
    except Exception:
        return False


def _script_ok(model: torch.nn.Module) -> bool:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.jit.script(model)
        return True
    except Exception:
        return False


def _forward_ms(model: torch.nn.Module, x: torch.Tensor, repeats: int = 5) -> float:
    model(x)  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        model(x)
    return (time.perf_counter() - start) / repeats * 1e3


def main(argv: list[str]) -> int:
    extended = "--no-export" not in argv
    torch.manual_seed(0)
    failures: list[str] = []
    print(f"{'model':<20}{'params':>9}{'fwd ms':>8}  fx   export script")
    for name, spec in REFERENCE_MODELS.items():
        model = build(name)
        x = torch.randn(spec.input_shape)
        with torch.no_grad():
            out = model(x)
            out1 = model(x[:1])
            if name == "untraceable_tiny":  # exercise both branches
                out = torch.cat([out, model(-x)])
            ms = _forward_ms(model, x)
        if not (torch.isfinite(out).all() and torch.isfinite(out1).all()):
            failures.append(f"{name}: non-finite output")
        if out1.shape[0] != 1:
            failures.append(f"{name}: batch-1 output has shape {tuple(out1.shape)}")
        again = build(name)
        with torch.no_grad():
            if not torch.equal(again(x), model(x)):
                failures.append(f"{name}: build() is not deterministic")
        fx = _fx_ok(model)
        if fx != spec.traceable:
            failures.append(f"{name}: traceable={spec.traceable} but symbolic_trace {'works' if fx else 'fails'}")
        if ms > 50:
            failures.append(f"{name}: forward took {ms:.1f} ms")
        export = script = "-"
        if extended:
            export = "ok" if _export_ok(model, x) else "FAIL"
            script = "ok" if _script_ok(model) else "FAIL"
        n_params = sum(p.numel() for p in model.parameters())
        print(f"{name:<20}{n_params:>9}{ms:>8.2f}  {'yes' if fx else 'no ':<4} {export:<6} {script}")

    model = build(RESNET50.name)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{RESNET50.name}: {n_params} params (input {RESNET50.input_shape})")
    if not 25_000_000 < n_params < 26_000_000:
        failures.append(f"resnet50: unexpected parameter count {n_params}")

    for failure in failures:
        print("FAIL:", failure)
    print("OK" if not failures else f"{len(failures)} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
