"""Reproduce the BatchNorm article's training claims on resnet_digits (sklearn's 8x8 digits, offline).

    python scripts/article_experiments.py            # ~5-10 min on 2 cores; writes docs/*.png and docs/training.md
    python scripts/article_experiments.py --quick    # smoke run (~1 min), into a temporary directory

Four experiments, each a PNG plus a markdown table:

1. lr_tolerance.png      learning-rate tolerance, with vs without BN (constant SGD learning rate)
2. init_sensitivity.png  weights ~ normal(0, std), with vs without BN, several seeds
3. forgotten_eval.png    a trained model scored in eval vs train mode at inference batch sizes 1, 8, 64
4. running_stats.png     BN momentum 0.1 vs None (cumulative), running statistics as trained vs "precise"
                         population statistics re-estimated on the training set

The tables are written between ``<!-- BEGIN GENERATED: name -->`` / ``<!-- END GENERATED: name -->`` markers
in docs/training.md, so the prose around them survives a rerun. Nothing is cached; the only outputs are the
PNGs and the markdown (and, with --quick, a temporary directory).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "scripts"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from torch import nn
from train import (
    TrainConfig,
    accuracy,
    eval_accuracy,
    is_batchnorm,
    load_digits_split,
    train,
)

BN_COLOR, NOBN_COLOR = "tab:blue", "tab:orange"


# ------------------------------------------------------------------------------------------------- helpers


def fmt_acc(values: list[float]) -> str:
    """'97.2%' for one value, '97.2% (96.9-97.5)' = mean (min-max) for several."""
    if len(values) == 1:
        return f"{100 * values[0]:.1f}%"
    return f"{100 * statistics.mean(values):.1f}% ({100 * min(values):.1f}-{100 * max(values):.1f})"


def fmt_loss(x: float) -> str:
    if not math.isfinite(x):
        return "NaN/inf"
    return f"{x:.3g}"


def md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


class Runner:
    """Runs train() quietly and counts runs/time for the overall progress bar."""

    def __init__(self, data, progress, task):
        self.data, self.progress, self.task = data, progress, task

    def __call__(self, **kw) -> dict:
        result = train(TrainConfig(progress=False, **kw), self.data)
        self.progress.advance(self.task)
        return result


# ----------------------------------------------------------------------------------------- 1. lr tolerance


LR_VARIANTS = [  # (label, train() overrides, colour, line style)
    ("BN", {"no_bn": False}, BN_COLOR, "-"),
    ("no BN", {"no_bn": True}, NOBN_COLOR, "-"),
    ("no BN, He init", {"no_bn": True, "init": "he"}, "tab:purple", "--"),
]


def exp_lr_tolerance(run: Runner, lrs, seeds, epochs, out_dir: Path) -> dict:
    results = {}
    for name, overrides, _, _ in LR_VARIANTS:
        for lr in lrs:
            for seed in seeds:
                s = run(lr=lr, seed=seed, epochs=epochs, schedule="constant", **overrides)["summary"]
                results[(name, lr, seed)] = s

    def col(name, lr, key):
        return [results[(name, lr, s)][key] for s in seeds]

    acc_rows, div_rows = [], []
    for lr in lrs:
        acc_row, div_row = [f"{lr:g}"], [f"{lr:g}"]
        for name, *_ in LR_VARIANTS:
            acc_row.append(fmt_acc(col(name, lr, "test_acc_eval")))
            losses = col(name, lr, "final_train_loss")
            worst = max(losses) if all(math.isfinite(x) for x in losses) else float("nan")
            div_row.append(f"{sum(col(name, lr, 'diverged'))}/{len(seeds)} ({fmt_loss(worst)})")
        acc_rows.append(acc_row)
        div_rows.append(div_row)
    names = [v[0] for v in LR_VARIANTS]
    table = ("Test accuracy (eval mode), mean (min-max) over seeds:\n\n"
             + md_table(["lr", *names], acc_rows)
             + "\n\nDiverged runs (worst final training loss; the first batch's loss is about 2.3):\n\n"
             + md_table(["lr", *names], div_rows))

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11.5, 4.4))
    for name, _, color, style in LR_VARIANTS:
        means = [statistics.mean(col(name, lr, "test_acc_eval")) * 100 for lr in lrs]
        ax1.plot(lrs, means, style, marker="o", color=color, label=name)
        for lr in lrs:
            for seed in seeds:
                s = results[(name, lr, seed)]
                if s["diverged"]:
                    ax1.plot(lr, s["test_acc_eval"] * 100, "x", color="red", markersize=11, mew=2.5)
        # final train loss relative to the first batch's loss; NaN/inf drawn at the top edge
        ratios = []
        for lr in lrs:
            worst = 0.0
            for seed in seeds:
                s = results[(name, lr, seed)]
                r = s["final_train_loss"] / s["initial_loss"] if s["initial_loss"] else float("nan")
                worst = float("inf") if not math.isfinite(r) else max(worst, r)
            ratios.append(worst)
        ax2.plot(lrs, [r if math.isfinite(r) else 1e3 for r in ratios], style, marker="o", color=color, label=name)
        for lr, r in zip(lrs, ratios):
            if not math.isfinite(r):
                ax2.annotate("NaN", (lr, 1e3), textcoords="offset points", xytext=(0, 6), ha="center",
                             color=color, fontsize=9)
    ax1.plot([], [], "x", color="red", markersize=11, mew=2.5, label="diverged run")
    ax1.axhline(10, color="gray", lw=0.8, ls=":")
    ax1.set(xscale="log", xlabel="SGD learning rate (constant, momentum 0.9)", ylabel="final test accuracy (%)",
            title=f"Test accuracy after {epochs} epochs (mean of {len(seeds)} seeds)", ylim=(0, 102))
    ax1.legend(loc="center left", fontsize=8)
    ax2.axhline(10, color="red", lw=0.8, ls="--", label="divergence threshold (10x)")
    ax2.set(xscale="log", yscale="log", xlabel="SGD learning rate (constant, momentum 0.9)",
            ylabel="final train loss / first-batch loss (worst seed)", title="Training loss at the end (NaN: top)",
            ylim=(1e-4, 5e3))
    ax2.legend(loc="lower right", fontsize=8)
    fig.suptitle("1. Learning-rate tolerance: resnet_digits with vs without BatchNorm")
    fig.tight_layout()
    fig.savefig(out_dir / "lr_tolerance.png", dpi=110)
    plt.close(fig)
    return {"table": table, "results": {f"{k[0]} lr={k[1]:g} seed={k[2]}": v for k, v in results.items()}}


# ---------------------------------------------------------------------------------- 2. init sensitivity


def exp_init(run: Runner, stds, seeds, epochs, lr, out_dir: Path) -> dict:
    # references: None = torch's default (Kaiming-uniform, a=sqrt(5)) init; "he" = normal(0, sqrt(2/fan_in))
    inits = [None, "he", *stds]
    results = {}
    for no_bn in (False, True):
        for std in inits:
            kw = {"init": "he"} if std == "he" else {"init_std": std}
            for seed in seeds:
                results[(no_bn, std, seed)] = run(lr=lr, seed=seed, epochs=epochs, schedule="cosine", no_bn=no_bn,
                                                  **kw)["summary"]

    def accs(no_bn, std):
        return [results[(no_bn, std, s)]["test_acc_eval"] for s in seeds]

    def ndiv(no_bn, std):
        return sum(results[(no_bn, std, s)]["diverged"] for s in seeds)

    rows = []
    for std in inits:
        name = {None: "torch default (Kaiming-uniform, a=√5)", "he": "He: normal(0, √(2/fan_in))"}.get(
            std, f"normal(0, {std})")
        rows.append([name, fmt_acc(accs(False, std)), f"{ndiv(False, std)}/{len(seeds)}",
                     fmt_acc(accs(True, std)), f"{ndiv(True, std)}/{len(seeds)}"])
    table = md_table(["init of conv/linear weights", "BN: test acc, mean (min-max)", "BN: diverged",
                      "no BN: test acc, mean (min-max)", "no BN: diverged"], rows)

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for no_bn, color, label, dx in ((False, BN_COLOR, "with BN", 0.94), (True, NOBN_COLOR, "without BN", 1.06)):
        xs = [std * dx for std in stds]
        means = [100 * statistics.mean(accs(no_bn, s)) for s in stds]
        lo = [m - 100 * min(accs(no_bn, s)) for m, s in zip(means, stds)]
        hi = [100 * max(accs(no_bn, s)) - m for m, s in zip(means, stds)]
        ax.errorbar(xs, means, yerr=[lo, hi], fmt="-o", color=color, capsize=4, label=f"{label}: normal(0, std)")
        ax.axhline(100 * statistics.mean(accs(no_bn, None)), color=color, ls="--", lw=1,
                   label=f"{label}: torch default init")
        ax.axhline(100 * statistics.mean(accs(no_bn, "he")), color=color, ls="-.", lw=1,
                   label=f"{label}: He init")
    ax.axhline(10, color="gray", lw=0.8, ls=":")
    ax.set(xscale="log", xlabel="std of the normal init of every conv/linear weight",
           ylabel="test accuracy (%), mean and min-max", ylim=(0, 102),
           title=f"2. Init sensitivity: {epochs} epochs, SGD lr {lr:g} cosine, {len(seeds)} seeds")
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "init_sensitivity.png", dpi=110)
    plt.close(fig)
    return {"table": table, "results": {f"{'noBN' if k[0] else 'BN'} std={k[1]} seed={k[2]}": v
                                        for k, v in results.items()}}


# ----------------------------------------------------------------------------------- 3. forgotten eval()


def bn_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if "running_" in k}


@torch.no_grad()
def exp_forgotten_eval(model: nn.Module, x_te, y_te, batch_sizes, out_dir: Path) -> dict:
    model.eval()
    before = bn_buffers(model)
    smallest = _smallest_bn_input(model, x_te[:1])
    rows, plot = [], []
    for bs in batch_sizes:
        acc_eval = accuracy(model, x_te, y_te, batch_size=bs)
        polluted = copy.deepcopy(model).train()  # a train-mode forward updates the running stats: use a copy
        try:
            acc_train = accuracy(polluted, x_te, y_te, batch_size=bs)
            train_text = f"{100 * acc_train:.1f}%"
        except Exception as exc:  # e.g. "Expected more than 1 value per channel when training"
            acc_train, train_text = None, f"error: {type(exc).__name__}: {str(exc).splitlines()[0]}"
        acc_after = eval_accuracy(polluted, x_te, y_te)
        rows.append([str(bs), f"{100 * acc_eval:.1f}%", train_text, f"{100 * acc_after:.1f}%"])
        plot.append((bs, acc_eval, acc_train, acc_after))
    unchanged = all(torch.equal(before[k], v) for k, v in bn_buffers(model).items())
    table = md_table(["inference batch size", "eval mode (correct)", "train mode (forgot eval(), no_grad)",
                      "eval mode afterwards on the copy that ran in train mode"], rows)

    fig, ax = plt.subplots(figsize=(8, 4.8))
    width = 0.27
    xs = range(len(plot))
    ax.bar([x - width for x in xs], [100 * p[1] for p in plot], width, label="eval mode", color=BN_COLOR)
    ax.bar(list(xs), [100 * (p[2] or 0) for p in plot], width, label="train mode (batch statistics)",
           color="tab:red")
    ax.bar([x + width for x in xs], [100 * p[3] for p in plot], width,
           label="eval mode after a train-mode pass\n(running stats overwritten)", color="tab:gray")
    for x, p in zip(xs, plot):
        for dx, v in ((-width, p[1]), (0, p[2]), (width, p[3])):
            ax.text(x + dx, 100 * (v or 0) + 1, "error" if v is None else f"{100 * v:.1f}", ha="center",
                    fontsize=8)
    ax.set_xticks(list(xs), [f"batch {p[0]}" for p in plot])
    ax.axhline(10, color="gray", lw=0.8, ls=":")
    ax.set(ylabel="test accuracy (%)", ylim=(0, 108),
           title="3. Forgotten model.eval(): a trained resnet_digits at inference")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.08), fontsize=8, ncol=3, frameon=False)
    fig.tight_layout()
    fig.savefig(out_dir / "forgotten_eval.png", dpi=110)
    plt.close(fig)
    return {"table": table, "original_running_stats_unchanged": unchanged, "smallest_bn_input": smallest,
            "results": [{"batch_size": p[0], "eval": p[1], "train": p[2], "eval_after_train_pass": p[3]}
                        for p in plot]}


def _bn_order(model: nn.Module, x: torch.Tensor) -> list[tuple[str, nn.Module]]:
    """BatchNorms in the order the forward pass runs them (each once)."""
    names = {m: n for n, m in model.named_modules()}
    order, handles = [], []
    for m in model.modules():
        if is_batchnorm(m):
            handles.append(m.register_forward_pre_hook(lambda mod, inp: order.append(mod)))
    try:
        with torch.no_grad():
            was = model.training
            model.eval()
            model(x)
            model.train(was)
    finally:
        for h in handles:
            h.remove()
    seen, out = set(), []
    for m in order:
        if m not in seen:
            seen.add(m)
            out.append((names[m], m))
    return out


def _smallest_bn_input(model: nn.Module, x: torch.Tensor) -> str:
    shapes = []
    hooks = [m.register_forward_pre_hook(lambda mod, inp: shapes.append(tuple(inp[0].shape[2:])))
             for m in model.modules() if is_batchnorm(m)]
    try:
        with torch.no_grad():
            model.eval()(x)
    finally:
        for h in hooks:
            h.remove()
    smallest = min(shapes, key=lambda s: math.prod(s))
    return "x".join(map(str, smallest))


# ---------------------------------------------------------------------------------- 4. running statistics


@torch.no_grad()
def precise_bn_local(model: nn.Module, x_train: torch.Tensor, batch_size: int = 256) -> nn.Module:
    """A copy of ``model`` whose BN running stats are the exact population statistics of the training set.

    Layer by layer in forward order, model in eval mode: hook the BN's input, accumulate per-channel sum and
    sum of squares in float64 over every training sample (and spatial position), set running_mean to the mean
    and running_var to the unbiased estimate (biased variance x n/(n-1)); then the next BN sees inputs
    produced with the already-corrected statistics upstream.
    """
    model = copy.deepcopy(model).eval()
    for _, bn in _bn_order(model, x_train[:2]):
        acc = {"s": None, "ss": None, "n": 0}

        def hook(mod, inp, acc=acc):
            x = inp[0].detach().double()
            dims = [0, *range(2, x.dim())]
            s, ss = x.sum(dims), (x * x).sum(dims)
            acc["s"] = s if acc["s"] is None else acc["s"] + s
            acc["ss"] = ss if acc["ss"] is None else acc["ss"] + ss
            acc["n"] += x.numel() // x.shape[1]

        handle = bn.register_forward_pre_hook(hook)
        try:
            for i in range(0, len(x_train), batch_size):
                model(x_train[i:i + batch_size])
        finally:
            handle.remove()
        n = acc["n"]
        mean = acc["s"] / n
        var = (acc["ss"] / n - mean * mean).clamp_min(0.0) * (n / (n - 1))
        bn.running_mean.copy_(mean.to(bn.running_mean.dtype))
        bn.running_var.copy_(var.to(bn.running_var.dtype))
    return model


def precise_bn(model: nn.Module, x_train: torch.Tensor) -> tuple[nn.Module, str, float | None]:
    """(recalibrated copy, method used, max |difference| between bnfold.recalibrate and the local estimate)."""
    local = precise_bn_local(model, x_train)
    try:
        import bnfold

        recalibrate = bnfold.recalibrate
    except (ImportError, AttributeError):
        return local, "local precise-BN estimate (bnfold.recalibrate not available)", None
    batches = [x_train[i:i + 256] for i in range(0, len(x_train), 256)]
    result = recalibrate(copy.deepcopy(model).eval(), batches)
    recal = getattr(result, "model", result)
    a, b = bn_buffers(recal), bn_buffers(local)
    diff = max((a[k].double() - b[k].double()).abs().max().item() for k in b)
    return recal.eval(), "bnfold.recalibrate", diff


def stat_discrepancy(trained: nn.Module, precise: nn.Module, x: torch.Tensor) -> dict:
    """Per-BN (forward order) mean |Δmean|, mean |Δmean|/σ and mean var ratio (as trained / precise)."""
    pm = dict(precise.named_modules())
    layers = []
    all_dm, all_dms, all_ratio = [], [], []
    for name, bn in _bn_order(trained, x[:2]):
        ref = pm[name]
        dm = (bn.running_mean.double() - ref.running_mean.double()).abs()
        sigma = ref.running_var.double().clamp_min(1e-12).sqrt()
        ratio = bn.running_var.double() / ref.running_var.double().clamp_min(1e-12)
        layers.append({"name": name, "mean_abs_dmean": dm.mean().item(), "mean_abs_dmean_over_sigma":
                       (dm / sigma).mean().item(), "mean_var_ratio": ratio.mean().item()})
        all_dm.append(dm)
        all_dms.append(dm / sigma)
        all_ratio.append(ratio)
    cat = torch.cat
    return {"layers": layers, "mean_abs_dmean": cat(all_dm).mean().item(),
            "mean_abs_dmean_over_sigma": cat(all_dms).mean().item(),
            "mean_var_ratio": cat(all_ratio).mean().item(),
            "median_var_ratio": cat(all_ratio).median().item()}


def exp_running_stats(run: Runner, data, seeds, epochs, lr, out_dir: Path) -> dict:
    x_tr, _, x_te, y_te = data
    configs = [("cosine", 0.1), ("cosine", None), ("constant", 0.1), ("constant", None)]
    results, methods, diffs = {}, set(), []
    params: dict[tuple, dict] = {}  # BN momentum only touches the buffers: the weights should not depend on it
    same_weights = True
    for schedule, mom in configs:
        for seed in seeds:
            r = run(lr=lr, seed=seed, epochs=epochs, schedule=schedule, bn_momentum=mom)
            model = r["model"].eval()
            weights = {k: v.detach().clone() for k, v in model.named_parameters()}
            if (schedule, seed) in params:
                same_weights &= all(torch.equal(v, params[(schedule, seed)][k]) for k, v in weights.items())
            params[(schedule, seed)] = weights
            precise, method, diff = precise_bn(model, x_tr)
            methods.add(method)
            if diff is not None:
                diffs.append(diff)
            results[(schedule, mom, seed)] = {
                "acc_trained": eval_accuracy(model, x_te, y_te),
                "acc_precise": eval_accuracy(precise, x_te, y_te),
                "train_acc_trained": eval_accuracy(model, x_tr, data[1]),
                "train_acc_precise": eval_accuracy(precise, x_tr, data[1]),
                "discrepancy": stat_discrepancy(model, precise, x_tr),
            }

    def label(schedule, mom):
        m = "None (cumulative)" if mom is None else f"{mom:g}"
        end = "lr -> 0 (cosine)" if schedule == "cosine" else f"lr {lr:g} constant"
        return m, end

    rows = []
    for schedule, mom in configs:
        rs = [results[(schedule, mom, s)] for s in seeds]
        m, end = label(schedule, mom)
        rows.append([m, end, fmt_acc([r["acc_trained"] for r in rs]), fmt_acc([r["acc_precise"] for r in rs]),
                     f"{statistics.mean(r['discrepancy']['mean_abs_dmean'] for r in rs):.3g}",
                     f"{statistics.mean(r['discrepancy']['mean_abs_dmean_over_sigma'] for r in rs):.3g}",
                     f"{statistics.mean(r['discrepancy']['mean_var_ratio'] for r in rs):.3g}",
                     f"{statistics.mean(r['discrepancy']['median_var_ratio'] for r in rs):.3g}"])
    table = md_table(["BN momentum", "training ends with", "test acc, stats as trained",
                      "test acc, precise stats", "mean abs Δmean", "mean abs Δmean / σ",
                      "mean var ratio (trained/precise)", "median var ratio"], rows)

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6))
    ax = axes[0]
    width = 0.38
    xs = list(range(len(configs)))
    for dx, key, color, name in ((-width / 2, "acc_trained", "tab:gray", "running stats as trained"),
                                 (width / 2, "acc_precise", "tab:green", "precise stats (re-estimated)")):
        vals = [[100 * results[(sc, mo, s)][key] for s in seeds] for sc, mo in configs]
        means = [statistics.mean(v) for v in vals]
        ax.bar([x + dx for x in xs], means, width, color=color, label=name,
               yerr=[[m - min(v) for m, v in zip(means, vals)], [max(v) - m for m, v in zip(means, vals)]],
               capsize=3)
        for x, m in zip(xs, means):
            ax.text(x + dx, m + 1.5, f"{m:.1f}", ha="center", fontsize=8)
    ax.set_xticks(xs, [f"mom {label(sc, mo)[0].split(' ')[0]}\n{'cosine' if sc == 'cosine' else 'const lr'}"
                       for sc, mo in configs], fontsize=8)
    ax.set(ylabel="test accuracy in eval mode (%)", ylim=(0, 128), title="Test accuracy")
    ax.legend(loc="upper center", fontsize=7.5, ncol=2)
    styles = {("cosine", 0.1): ("tab:blue", "-"), ("cosine", None): ("tab:blue", "--"),
              ("constant", 0.1): ("tab:red", "-"), ("constant", None): ("tab:red", "--")}
    for ax, key, ylabel, logy in ((axes[1], "mean_abs_dmean_over_sigma", "mean |Δmean| / σ_precise", True),
                                  (axes[2], "mean_var_ratio", "mean var ratio (as trained / precise)", False)):
        for sc, mo in configs:
            layers = [results[(sc, mo, s)]["discrepancy"]["layers"] for s in seeds]
            ys = [statistics.mean(ls[i][key] for ls in layers) for i in range(len(layers[0]))]
            color, ls_ = styles[(sc, mo)]
            m, end = label(sc, mo)
            ax.plot(range(len(ys)), ys, ls_, marker="o", color=color, label=f"momentum {m}, {end}")
        names = [d["name"] for d in results[(configs[0][0], configs[0][1], seeds[0])]["discrepancy"]["layers"]]
        ax.set_xticks(range(len(names)), [n.replace("stages.", "s").replace("downsample.1", "ds") for n in names],
                      rotation=45, ha="right", fontsize=7)
        ax.set(ylabel=ylabel, xlabel="BatchNorm layer (forward order)", yscale="log" if logy else "linear")
        if key == "mean_var_ratio":
            ax.axhline(1.0, color="gray", lw=0.8, ls=":")
    axes[1].set_title("Running mean vs precise mean")
    axes[2].set_title("Running var vs precise var")
    axes[2].legend(fontsize=7, loc="best", handlelength=3.5)
    fig.suptitle(f"4. Running statistics: BN momentum 0.1 vs None (cumulative), {epochs} epochs, peak lr {lr:g}, "
                 f"{len(seeds)} seed(s)")
    fig.tight_layout()
    fig.savefig(out_dir / "running_stats.png", dpi=110)
    plt.close(fig)
    return {"table": table, "method": sorted(methods), "recalibrate_vs_local_max_abs_diff": max(diffs, default=None),
            "same_weights_for_both_momenta": same_weights,
            "results": {f"{k[0]} momentum={k[1]} seed={k[2]}": v for k, v in results.items()}}


# ---------------------------------------------------------------------------------------------- markdown


def update_markdown(path: Path, sections: dict[str, str]) -> None:
    """Replace each ``<!-- BEGIN GENERATED: name -->...<!-- END GENERATED: name -->`` block (append if absent)."""
    text = path.read_text() if path.exists() else "# Training BatchNorm networks: the article's claims, measured\n"
    for name, body in sections.items():
        block = f"<!-- BEGIN GENERATED: {name} -->\n{body.rstrip()}\n<!-- END GENERATED: {name} -->"
        tag = re.escape(name)
        pattern = re.compile(rf"<!-- BEGIN GENERATED: {tag} -->.*?<!-- END GENERATED: {tag} -->", re.DOTALL)
        if pattern.search(text):
            text = pattern.sub(lambda _, block=block: block, text)
        else:
            text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)


# --------------------------------------------------------------------------------------------------- main


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny budgets, for a smoke run (writes to a temp dir)")
    p.add_argument("--out-dir", default=None, help="where the PNGs and training.md go (default: docs/, or a "
                                                   "temporary directory with --quick)")
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    out_dir = Path(a.out_dir) if a.out_dir else (Path(tempfile.mkdtemp(prefix="bnfold_article_")) if a.quick
                                                  else ROOT / "docs")
    out_dir.mkdir(parents=True, exist_ok=True)

    if a.quick:
        lrs, lr_seeds, lr_epochs = [0.01, 0.3, 3.0], [0], 1
        stds, init_seeds, init_epochs = [0.01, 1.0], [0], 1
        eval_epochs, bss = 2, [1, 8, 64]
        rs_seeds, rs_epochs = [0], 2
    else:
        lrs, lr_seeds, lr_epochs = [0.01, 0.03, 0.1, 0.3, 1.0, 3.0], [0, 1], 8
        stds, init_seeds, init_epochs = [0.01, 0.1, 1.0], [0, 1, 2], 8
        eval_epochs, bss = 15, [1, 8, 64]
        rs_seeds, rs_epochs = [0, 1], 15
    init_lr, rs_lr = 0.05, 0.1
    n_runs = len(LR_VARIANTS) * len(lrs) * len(lr_seeds) + 2 * (len(stds) + 2) * len(init_seeds) + 1 \
        + 4 * len(rs_seeds)

    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    data = load_digits_split()
    timings, sections, record = {}, {}, {}
    t_all = time.perf_counter()
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()) \
            as progress:
        task = progress.add_task("training runs", total=n_runs)
        run = Runner(data, progress, task)

        t = time.perf_counter()
        progress.update(task, description="1. lr tolerance")
        r1 = exp_lr_tolerance(run, lrs, lr_seeds, lr_epochs, out_dir)
        timings["1. lr tolerance"] = time.perf_counter() - t

        t = time.perf_counter()
        progress.update(task, description="2. init sensitivity")
        r2 = exp_init(run, stds, init_seeds, init_epochs, init_lr, out_dir)
        timings["2. init sensitivity"] = time.perf_counter() - t

        t = time.perf_counter()
        progress.update(task, description="3. forgotten eval()")
        ref = run(lr=0.1, seed=0, epochs=eval_epochs, schedule="cosine")
        r3 = exp_forgotten_eval(ref["model"], data[2], data[3], bss, out_dir)
        r3["reference_run"] = ref["summary"]
        timings["3. forgotten eval()"] = time.perf_counter() - t

        t = time.perf_counter()
        progress.update(task, description="4. running statistics")
        r4 = exp_running_stats(run, data, rs_seeds, rs_epochs, rs_lr, out_dir)
        timings["4. running statistics"] = time.perf_counter() - t
    total = time.perf_counter() - t_all

    sections["lr_tolerance"] = (
        f"Setup: SGD, constant learning rate, momentum 0.9, weight decay 5e-4, batch 64, {lr_epochs} epochs, "
        f"seeds {lr_seeds}. *BN*: resnet_digits as built (torch's default init); *no BN*: the same network with "
        "every BatchNorm replaced by nn.Identity, same init; *no BN, He init*: the same, with every conv/linear "
        "weight drawn from normal(0, √(2/fan_in)). Test accuracy is in eval mode after the last epoch "
        "(mean (min-max) over seeds). "
        "*Diverged*: a NaN/inf loss (training stops there) or a last-epoch mean training loss above 10x the "
        "first batch's loss.\n\n" + r1["table"] + "\n\n![lr tolerance](lr_tolerance.png)")
    sections["init_sensitivity"] = (
        f"Setup: every conv/linear *weight* drawn from normal(0, std) (biases and BN affine parameters as "
        f"built); SGD lr {init_lr:g} with cosine decay, momentum 0.9, weight decay 5e-4, batch 64, "
        f"{init_epochs} epochs, seeds {init_seeds}; test accuracy in eval mode, mean (min-max).\n\n"
        + r2["table"] + "\n\n![init sensitivity](init_sensitivity.png)")
    sections["forgotten_eval"] = (
        f"Model: resnet_digits trained {eval_epochs} epochs (SGD lr 0.1 cosine, momentum 0.9, wd 5e-4, seed 0): "
        f"{100 * ref['summary']['test_acc_eval']:.1f}% test accuracy in eval mode. Test images in their fixed "
        f"order, cut into batches of the given size; the train-mode passes run under torch.no_grad() on a "
        f"deepcopy. Smallest spatial map any BN sees: {r3['smallest_bn_input']}. The original model's running "
        f"statistics unchanged afterwards: {r3['original_running_stats_unchanged']}.\n\n"
        + r3["table"] + "\n\n![forgotten eval](forgotten_eval.png)")
    diff = r4["recalibrate_vs_local_max_abs_diff"]
    sections["running_stats"] = (
        f"Setup: SGD peak lr {rs_lr:g}, momentum 0.9, wd 5e-4, batch 64, {rs_epochs} epochs, seeds {rs_seeds}; "
        "either cosine decay (the weights barely move at the end) or a constant learning rate (they still move "
        "when training stops). Precise statistics: " + ", ".join(r4["method"])
        + (f" (max |difference| from the local estimate: {diff:.2g})" if diff is not None else "")
        + ". Trained weights identical for momentum 0.1 and None (same schedule and seed): "
        + f"{r4['same_weights_for_both_momenta']} (the momentum only changes the running buffers). "
        "Δmean and the variance ratio compare the as-trained running statistics with the precise ones, "
        "averaged over every channel of every BN (σ: precise standard deviation); accuracies are mean "
        "(min-max) over seeds.\n\n" + r4["table"] + "\n\n![running statistics](running_stats.png)")
    timing_rows = [[k, f"{v:.0f} s"] for k, v in timings.items()] + [["total", f"{total:.0f} s"]]
    sections["runtime"] = (f"Last run: `python scripts/article_experiments.py{' --quick' if a.quick else ''}`, "
                           f"torch {torch.__version__}, {a.threads} threads.\n\n"
                           + md_table(["experiment", "wall time"], timing_rows))
    update_markdown(out_dir / "training.md", sections)

    record = {"lr_tolerance": r1, "init_sensitivity": r2, "forgotten_eval": r3, "running_stats": r4,
              "timings_s": timings, "total_s": total}
    for name, body in sections.items():
        print(f"\n## {name}\n\n{body}")
    raw = Path(tempfile.mkdtemp(prefix="bnfold_article_raw_")) / "results.json"
    raw.write_text(json.dumps(record, indent=1, default=str))
    print(f"\nwrote {out_dir} ({total:.0f} s); raw numbers: {raw}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
