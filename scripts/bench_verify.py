"""Time `bnfold.verify` stage by stage on the reference models and a ResNet-50-size model.

Targets (issue "bnfold verify"): everything except the ONNX export itself under 25% of the total, and the
whole verify of a ResNet-50-size model under 60 s with the fast (TorchScript) exporter, on a 2-core machine.

Usage (from the repository root):
    python scripts/bench_verify.py [--models resnet_tiny,resnet50] [--exporter torchscript] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bnfold  # noqa: E402
from models import zoo  # noqa: E402

STAGES = ("load", "audit", "fold", "export", "lint", "onnxruntime", "onnx compare")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join([*zoo.REFERENCE_MODELS, "resnet50"]))
    parser.add_argument("--exporter", default="torchscript", choices=["torchscript", "dynamo"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for name in args.models.split(","):
        spec = zoo.RESNET50 if name == "resnet50" else zoo.REFERENCE_MODELS[name]
        model = zoo.build(name)
        x = (torch.randn(spec.input_shape),)
        start = time.perf_counter()
        report = bnfold.verify(model, x, exporter=args.exporter)
        wall = time.perf_counter() - start
        t = report.timings
        total = t.get("total", wall)
        rest = total - t.get("export", 0.0)
        rows.append({"model": name, "input": list(spec.input_shape), "ok": report.ok,
                     **{s: round(t.get(s, 0.0), 3) for s in STAGES}, "total": round(total, 3),
                     "non_export_share": round(rest / total, 3)})
        print(f"{name}: {total:.2f} s, ok={report.ok}", file=sys.stderr)
    header = ["model", "input", *STAGES, "total s", "non-export share"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows:
        cells = [r["model"], "x".join(map(str, r["input"])), *(f"{r[s]:.3f}" for s in STAGES), f"{r['total']:.2f}",
                 f"{100 * r['non_export_share']:.0f}%"]
        print("| " + " | ".join(cells) + " |")
    if args.json:
        args.json.write_text(json.dumps({"torch": torch.__version__, "threads": args.threads,
                                         "exporter": args.exporter, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
