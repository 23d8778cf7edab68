"""Train a zoo model on scikit-learn's bundled 8x8 digits (offline) and write a checkpoint plus metrics.

    python scripts/train.py --model resnet_digits --epochs 30 --lr 0.1 --out runs/digits

writes into ``--out``:

* ``checkpoint.safetensors``: the model's state dict (keys exactly as the zoo factory builds it, so
  ``bnfold fuse DIR/checkpoint.safetensors --arch models.zoo:resnet_digits --input-shape 8,1,8,8`` loads it;
  with ``--no-bn`` the BatchNorm entries are absent);
* ``metrics.csv``: one row per epoch: ``epoch,train_loss,train_acc,test_acc_eval,lr`` (train loss/accuracy
  averaged over the epoch's batches in train mode; test accuracy in eval mode after the epoch; lr at the
  epoch's first step);
* ``summary.json``: the configuration, final accuracies, divergence flag, versions and date.

``--export PATH.safetensors`` also writes the state dict to PATH.safetensors and a short PATH.json beside it
(accuracy, seed, epochs, dataset, date, torch version); that is how the bundled
``models/checkpoints/resnet_digits.safetensors`` is made (see docs/training.md).

``train(TrainConfig(...))`` does the same from Python (``scripts/article_experiments.py`` and
``tests/test_training.py`` import it) and returns a dict that also holds the trained model.

Data: ``sklearn.datasets.load_digits()`` (1,797 images), pixels scaled 0..16 -> 0..1 and then standardised
with the training split's mean and standard deviation (one scalar each), stratified 80/20 split with a fixed
``--split-seed`` (independent of ``--seed``, so every run is scored on the same test images).
Run from the repository root or from anywhere (the repository root is put on ``sys.path``).
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import json
import math
import platform
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch
from torch import nn
from torch.nn import functional as F

# "default" leaves every BatchNorm's momentum as the model builds it (0.1 for torch's BNs); None means a
# cumulative average (torch's momentum=None).
BN_MOMENTUM_DEFAULT = "default"


@dataclass
class TrainConfig:
    model: str = "resnet_digits"
    epochs: int = 30
    batch_size: int = 64
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    seed: int = 0
    split_seed: int = 0
    test_size: float = 0.2
    schedule: str = "cosine"  # cosine (per step, to 0), step (x0.1 at 50% and 75%), constant
    bn_momentum: float | None | str = BN_MOMENTUM_DEFAULT
    no_bn: bool = False
    init: str = "default"  # "default": as torch builds it; "he": every conv/linear weight ~ normal(0, sqrt(2/fan_in))
    init_std: float | None = None  # normal(0, std) for every conv/linear weight (overrides init)
    max_steps: int | None = None  # stop after this many optimiser steps (tiny test runs)
    out: str | None = None
    progress: bool = True
    num_threads: int | None = None
    # A run "diverged" when a loss is NaN/inf (training stops there) or when the last epoch's mean training
    # loss exceeds divergence_factor x the loss of the very first batch.
    divergence_factor: float = 10.0
    extra: dict = field(default_factory=dict)  # free-form, copied into summary.json


# ----------------------------------------------------------------------------------------------------- data


def load_digits_split(split_seed: int = 0, test_size: float = 0.2, return_stats: bool = False):
    """(x_train, y_train, x_test, y_test) as float32 NCHW tensors (N,1,8,8) and int64 labels.

    With ``return_stats`` also the (mean, std) used to standardise the 0..1 pixels.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = digits.images.astype("float32") / 16.0  # 0..16 -> 0..1
    y = digits.target.astype("int64")
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=test_size, random_state=split_seed, stratify=y)
    mean, std = float(x_tr.mean()), float(x_tr.std())
    x_tr = (x_tr - mean) / std
    x_te = (x_te - mean) / std
    as_t = torch.from_numpy
    tensors = (as_t(x_tr).unsqueeze(1).contiguous(), as_t(y_tr), as_t(x_te).unsqueeze(1).contiguous(), as_t(y_te))
    return (*tensors, (mean, std)) if return_stats else tensors


# ---------------------------------------------------------------------------------------------------- model


def build_model(name: str, num_classes: int = 10) -> nn.Module:
    from models import zoo

    factory = getattr(zoo, name, None)
    if not callable(factory):
        raise SystemExit(f"unknown model {name!r}: not a factory in models.zoo")
    return factory(num_classes=num_classes)


def is_batchnorm(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.batchnorm._BatchNorm)


def strip_batchnorm(model: nn.Module) -> nn.Module:
    """Replace every BatchNorm with nn.Identity (in place; conv biases are left as they are)."""
    for name, child in list(model.named_children()):
        if is_batchnorm(child):
            setattr(model, name, nn.Identity())
        else:
            strip_batchnorm(child)
    return model


def set_bn_momentum(model: nn.Module, momentum: float | None) -> None:
    for m in model.modules():
        if is_batchnorm(m):
            m.momentum = momentum


@torch.no_grad()
def init_he(model: nn.Module, generator: torch.Generator) -> None:
    """Every conv/linear weight ~ normal(0, sqrt(2 / fan_in)) (Kaiming/He, for ReLU); biases as built."""
    for m in model.modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
            fan_in = m.weight[0].numel()
            m.weight.copy_(torch.randn(m.weight.shape, generator=generator) * math.sqrt(2.0 / fan_in))


@torch.no_grad()
def init_normal(model: nn.Module, std: float, generator: torch.Generator) -> None:
    """Every conv/linear weight ~ normal(0, std); biases and BN parameters are left as built."""
    for m in model.modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
            m.weight.copy_(torch.randn(m.weight.shape, generator=generator) * std)


# --------------------------------------------------------------------------------------------- evaluation


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 512) -> float:
    """Top-1 accuracy with the model in whatever mode it is in (callers choose eval/train)."""
    correct = 0
    for i in range(0, len(x), batch_size):
        correct += (model(x[i:i + batch_size]).argmax(1) == y[i:i + batch_size]).sum().item()
    return correct / len(x)


@torch.no_grad()
def eval_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    was_training = model.training
    model.eval()
    try:
        return accuracy(model, x, y)
    finally:
        model.train(was_training)


# ----------------------------------------------------------------------------------------------- training


def _make_scheduler(optimizer: torch.optim.Optimizer, schedule: str, total_steps: int):
    total_steps = max(total_steps, 1)
    if schedule == "cosine":
        fn: Callable[[int], float] = lambda s: 0.5 * (1.0 + math.cos(math.pi * min(s, total_steps) / total_steps))
    elif schedule == "step":
        fn = lambda s: 0.1 ** ((s >= 0.5 * total_steps) + (s >= 0.75 * total_steps))
    elif schedule == "constant":
        fn = lambda s: 1.0
    else:
        raise ValueError(f"unknown schedule {schedule!r} (cosine, step, constant)")
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)


def _progress(enabled: bool):
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                    disable=not enabled, transient=False)


def _finite(x: float) -> bool:
    return math.isfinite(x)


def train(config: TrainConfig, data=None) -> dict[str, Any]:
    """Train one model; returns a dict with the metrics, the summary and (under "model") the trained model.

    ``data`` may pass a ready (x_train, y_train, x_test, y_test) tuple to skip reloading the dataset.
    """
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    previous = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)  # the CPU kernels used here all have deterministic versions
    try:
        return _train(config, data)
    finally:  # leave the caller's process (a test session, a notebook) as it was
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])


def _train(config: TrainConfig, data) -> dict[str, Any]:
    if data is None:
        x_tr, y_tr, x_te, y_te, (px_mean, px_std) = load_digits_split(config.split_seed, config.test_size, True)
    else:
        x_tr, y_tr, x_te, y_te = data[:4]
        px_mean, px_std = data[4] if len(data) > 4 else (None, None)

    torch.manual_seed(config.seed)
    model = build_model(config.model, num_classes=int(y_tr.max()) + 1)
    if config.no_bn:
        strip_batchnorm(model)
    elif config.bn_momentum != BN_MOMENTUM_DEFAULT:
        set_bn_momentum(model, config.bn_momentum)  # type: ignore[arg-type]
    init_generator = torch.Generator().manual_seed(config.seed + 1_000_003)
    if config.init_std is not None:
        init_normal(model, config.init_std, init_generator)
    elif config.init == "he":
        init_he(model, init_generator)
    elif config.init != "default":
        raise ValueError(f"unknown init {config.init!r} (default, he)")

    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                                weight_decay=config.weight_decay)
    generator = torch.Generator().manual_seed(config.seed)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x_tr, y_tr), batch_size=config.batch_size,
                                         shuffle=True, generator=generator, drop_last=False)
    steps_per_epoch = len(loader)
    total_steps = config.epochs * steps_per_epoch
    if config.max_steps is not None:
        total_steps = min(total_steps, config.max_steps)
    scheduler = _make_scheduler(optimizer, config.schedule, total_steps)

    rows: list[dict[str, float]] = []
    initial_loss: float | None = None
    peak_loss = 0.0
    nonfinite = False
    step = 0
    with _progress(config.progress) as progress:
        task = progress.add_task(f"{config.model}{' (no BN)' if config.no_bn else ''} lr {config.lr:g}",
                                 total=total_steps, info="")
        for epoch in range(1, config.epochs + 1):
            if step >= total_steps or nonfinite:
                break
            model.train()
            epoch_lr = optimizer.param_groups[0]["lr"]
            loss_sum, correct, seen = 0.0, 0, 0
            for xb, yb in loader:
                if step >= total_steps:
                    break
                logits = model(xb)
                loss = F.cross_entropy(logits, yb)
                value = loss.item()
                if initial_loss is None:
                    initial_loss = value
                loss_sum += value * len(xb)
                correct += (logits.argmax(1) == yb).sum().item()
                seen += len(xb)
                if not _finite(value):  # nothing can recover from NaN/inf weights: stop here
                    nonfinite = True
                    break
                peak_loss = max(peak_loss, value)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                step += 1
                progress.update(task, advance=1, info=f"epoch {epoch} loss {value:.4f}")
            test_acc = eval_accuracy(model, x_te, y_te)
            rows.append({"epoch": epoch, "train_loss": loss_sum / max(seen, 1), "train_acc": correct / max(seen, 1),
                         "test_acc_eval": test_acc, "lr": epoch_lr})
            progress.update(task, info=f"epoch {epoch} loss {rows[-1]['train_loss']:.4f} test {test_acc:.4f}")

    final_loss = rows[-1]["train_loss"] if rows else float("nan")
    diverged = nonfinite or not _finite(final_loss) or (
        initial_loss is not None and final_loss > config.divergence_factor * initial_loss)
    model.eval()
    summary = {
        "config": {k: v for k, v in asdict(config).items() if k not in ("progress", "out")},
        "dataset": "sklearn.datasets.load_digits (8x8, 1797 images), stratified split "
                   f"{1 - config.test_size:.0%}/{config.test_size:.0%}, split_seed {config.split_seed}",
        "pixel_mean_std": [px_mean, px_std],  # of the 0..1 training pixels; None if the caller passed data
        "train_samples": len(x_tr),
        "test_samples": len(x_te),
        "steps": step,
        "epochs_run": len(rows),
        "initial_loss": initial_loss,
        "final_train_loss": final_loss,
        "peak_loss": peak_loss,
        "nonfinite_loss": nonfinite,
        "diverged": bool(diverged),
        "final_train_acc": rows[-1]["train_acc"] if rows else None,
        "test_acc_eval": rows[-1]["test_acc_eval"] if rows else None,
        "best_test_acc_eval": max((r["test_acc_eval"] for r in rows), default=None),
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    if config.out:
        write_outputs(Path(config.out), model, rows, summary)
    return {"model": model, "metrics": rows, "summary": summary}


def write_outputs(out: Path, model: nn.Module, rows: list[dict], summary: dict) -> None:
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    save_file(state, str(out / "checkpoint.safetensors"))
    with open(out / "metrics.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["epoch", "train_loss", "train_acc", "test_acc_eval", "lr"])
        writer.writeheader()
        for r in rows:
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    (out / "summary.json").write_text(json.dumps(_json_safe(summary), indent=2, default=str) + "\n")


def _json_safe(value):
    """NaN/inf (a diverged run's losses) become null, so that summary.json is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def export_checkpoint(path: Path, model: nn.Module, summary: dict, command: str | None = None) -> None:
    """State dict to ``path`` (safetensors) and a compact metadata JSON beside it."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}, str(path))
    c = summary["config"]
    meta = {
        "arch": f"models.zoo:{c['model']}" + (" with every BatchNorm replaced by nn.Identity" if c["no_bn"] else ""),
        "test_accuracy": summary["test_acc_eval"],
        "train_accuracy_last_epoch": summary["final_train_acc"],
        "final_train_loss": summary["final_train_loss"],
        "test_samples": summary["test_samples"],
        "seed": c["seed"],
        "epochs": summary["epochs_run"],
        "optimizer": f"SGD lr {c['lr']:g} momentum {c['momentum']:g} weight_decay {c['weight_decay']:g}, "
                     f"batch {c['batch_size']}, {c['schedule']} schedule",
        "dataset": summary["dataset"],
        "preprocessing": {"description": "x = (pixels / 16 - mean) / std, NCHW float32 (N,1,8,8); mean/std are "
                                         "scalars over the training split's 0..1 pixels",
                          "mean": summary["pixel_mean_std"][0], "std": summary["pixel_mean_std"][1]},
        "date": summary["date"],
        "torch_version": summary["torch_version"],
        "command": command,
    }
    path.with_suffix(".json").write_text(json.dumps(_json_safe(meta), indent=2) + "\n")


# ---------------------------------------------------------------------------------------------------- CLI


def _bn_momentum(text: str):
    if text == BN_MOMENTUM_DEFAULT:
        return BN_MOMENTUM_DEFAULT
    if text.lower() in ("none", "cumulative"):
        return None
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError("BN momentum must be in [0, 1] or 'none'")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be >= 1")
    return value


def parse_args(argv=None) -> tuple[str | None, TrainConfig]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="resnet_digits", help="a factory name in models.zoo")
    p.add_argument("--epochs", type=_positive_int, default=30)
    p.add_argument("--batch-size", type=_positive_int, default=64)
    p.add_argument("--lr", type=float, default=0.1, help="peak SGD learning rate")
    p.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--schedule", choices=["cosine", "step", "constant"], default="cosine")
    p.add_argument("--seed", type=int, default=0, help="weights and batch order")
    p.add_argument("--split-seed", type=int, default=0, help="train/test split")
    p.add_argument("--bn-momentum", type=_bn_momentum, default=BN_MOMENTUM_DEFAULT,
                   help="momentum of every BatchNorm: a number, 'none' for a cumulative average, or 'default' to keep "
                        "what the model builds (0.1 for torch's BatchNorm)")
    p.add_argument("--no-bn", action="store_true", help="replace every BatchNorm with nn.Identity")
    p.add_argument("--init", choices=["default", "he"], default="default",
                   help="conv/linear weight init: torch's default, or he = normal(0, sqrt(2/fan_in))")
    p.add_argument("--init-std", type=float, default=None,
                   help="init conv/linear weights ~ normal(0, std) (overrides --init)")
    p.add_argument("--max-steps", type=_positive_int, default=None, help="stop after this many optimiser steps")
    p.add_argument("--threads", type=_positive_int, default=None, help="torch.set_num_threads")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--export", default=None, metavar="PATH.safetensors",
                   help="also write the state dict here, plus PATH.json with accuracy/seed/epochs/dataset/date")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    a = p.parse_args(argv)
    if a.export and not a.export.endswith(".safetensors"):
        p.error("--export must end with .safetensors")
    config = TrainConfig(model=a.model, epochs=a.epochs, batch_size=a.batch_size, lr=a.lr, momentum=a.momentum,
                         weight_decay=a.weight_decay, seed=a.seed, split_seed=a.split_seed, schedule=a.schedule,
                         bn_momentum=a.bn_momentum, no_bn=a.no_bn, init=a.init, init_std=a.init_std,
                         max_steps=a.max_steps, out=a.out, progress=not a.no_progress, num_threads=a.threads)
    return a.export, config


def main(argv=None) -> int:
    export, config = parse_args(argv)
    result = train(config)
    s = result["summary"]
    if export:
        args = sys.argv[1:] if argv is None else list(argv)
        export_checkpoint(Path(export), result["model"], s, command=" ".join(["python scripts/train.py", *args]))
    print(f"test accuracy (eval mode) {s['test_acc_eval']:.4f} (best {s['best_test_acc_eval']:.4f}), "
          f"final train loss {s['final_train_loss']:.4f}, {s['steps']} steps"
          f"{', DIVERGED' if s['diverged'] else ''} -> {config.out}")
    return 1 if s["nonfinite_loss"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
