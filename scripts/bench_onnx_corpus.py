#!/usr/bin/env python
"""Benchmark bnfold on the ONNX producer corpus: BN and affine chains left per tool, parity, fold time (issue 15).

For every graph of ``models.onnx_corpus.CORPUS`` (one per producer spelling: paddle2onnx, tf2onnx NHWC, opset-9
torch, FrozenBatchNorm2d's Mul/Add, onnxruntime's own output, the unoptimised dynamo export, old opsets and IR
versions, ``value_floats`` constants), the graph as built (``input``) and what each tool makes of it:

* ``ort-basic``: onnxruntime at ``ORT_ENABLE_BASIC``, the optimised graph saved offline
  (``optimized_model_filepath``) and loaded back (``models.onnx_corpus.ort_basic``);
* ``onnxslim``: ``onnxslim.slim(model)`` with its defaults;
* ``onnxoptimizer``: ``onnxoptimizer.optimize(model, passes)`` with its default passes
  (``get_fuse_and_elimination_passes()``) plus ``fuse_bn_into_conv`` (already among them in 0.4);
* ``bnfold``: ``bnfold.onnx.fold.fold_graph(model)``.

Counted in each (``models.onnx_corpus.left``): the ``BatchNormalization`` nodes, and the affine chains, a BN written
out as elementwise ops: from a Conv/ConvTranspose/Gemm/MatMul output, through Transposes, the ``Mul``/``Div`` and
``Add``/``Sub`` by per-channel constants that follow it alone, counted once when they hold both a scale and a shift
(a lone bias ``Add`` is not counted). Cells read ``BN/affine``; `` !`` after one: that tool's graph does not
run or lost parity.

Parity: each tool's graph against the input graph in onnxruntime with every optimisation off, on the same seeded
inputs (dynamic dimensions at ``models.onnx_corpus.BATCH``): ``max |got - input| / max |input|`` over all output
elements; ``!`` marks a graph outside ``RTOL * scale + ATOL`` (``models.onnx_corpus.Parity``).

``bnfold <= best``: "yes" when bnfold leaves no more BNs than the fewest any other tool leaves, and no more affine
chains than the fewest any other tool leaves (each count against its own best), counting only the tools that ran
and kept parity. A tool that fails on a graph is "n/a", its reason in the notes.

Fold time: the median of ``--repeats`` calls of ``fold_graph`` (the graph in memory; no files, no onnxruntime).

Only measurement lives here; the folding is bnfold's, onnxruntime's, onnxslim's and onnxoptimizer's.

Usage::

    python scripts/bench_onnx_corpus.py
    python scripts/bench_onnx_corpus.py --entries paddle2onnx,tf2onnx_nhwc --repeats 9 --markdown /tmp/corpus.md
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import onnx  # noqa: E402
import onnxoptimizer  # noqa: E402
import onnxslim  # noqa: E402

# The table renderers, the tool-failure wrapper and the machine description of the ONNX benchmark.
from bench_onnx import attempt, log, machine_info, markdown_table, plain_table  # noqa: E402

from bnfold.onnx.export import captured_output  # noqa: E402
from bnfold.onnx.fold import fold_graph  # noqa: E402
from models.onnx_corpus import CORPUS, Left, example_feeds, left, ort_basic, parity, run_plain  # noqa: E402

OTHERS = ("ort-basic", "onnxslim", "onnxoptimizer")
COLUMNS = ("input", *OTHERS, "bnfold")
CHILD_TIMEOUT_S = 120
LEFT_TITLE = ("BatchNormalization / affine chains left (! = the graph does not run or lost parity: not counted as best; "
              "bnfold <= best: no more of either than the best other tool with parity); fold ms: median fold_graph")
PARITY_TITLE = ("Parity against the input graph (max |got - input| / max |input|, onnxruntime optimisations off; "
                "! = outside 1e-4 * scale + 1e-5)")
ONNXOPTIMIZER_PASSES = list(dict.fromkeys([*onnxoptimizer.get_fuse_and_elimination_passes(), "fuse_bn_into_conv"]))


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    copied = onnx.ModelProto()
    copied.CopyFrom(model)
    return copied


def via_onnxslim(model: onnx.ModelProto) -> onnx.ModelProto:
    with captured_output():
        return onnxslim.slim(model)


def via_onnxoptimizer(model: onnx.ModelProto) -> onnx.ModelProto:
    """In a child process: onnxoptimizer's C++ passes can take the whole process down (a segmentation fault)."""
    code = ("import sys, onnx, onnxoptimizer; "
            "onnx.save(onnxoptimizer.optimize(onnx.load(sys.argv[1]), sys.argv[3].split(',')), sys.argv[2])")
    with tempfile.TemporaryDirectory(prefix="bench-corpus-") as tmp:
        src, dst = Path(tmp) / "input.onnx", Path(tmp) / "optimized.onnx"
        onnx.save(model, str(src))
        done = subprocess.run([sys.executable, "-c", code, str(src), str(dst), ",".join(ONNXOPTIMIZER_PASSES)],
                              capture_output=True, text=True, timeout=CHILD_TIMEOUT_S, check=False)
        if done.returncode < 0:
            raise RuntimeError(f"onnxoptimizer.optimize killed the process: {signal.Signals(-done.returncode).name}")
        if done.returncode:
            raise RuntimeError((done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1])
        return onnx.load(str(dst))


#: Each takes its own copy of the input graph and returns the graph it makes of it.
TOOLS: dict[str, Callable[[onnx.ModelProto], onnx.ModelProto]] = {
    "ort-basic": ort_basic, "onnxslim": via_onnxslim, "onnxoptimizer": via_onnxoptimizer,
    "bnfold": lambda model: fold_graph(model, copy=False).model}


def fold_seconds(model: onnx.ModelProto, repeats: int) -> float:
    """Median seconds of ``fold_graph(model)`` (it copies the model first, as a caller keeping it would)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fold_graph(model)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_entry(name: str, repeats: int) -> dict[str, Any]:
    model = CORPUS[name]()
    feeds = example_feeds(model)
    reference = run_plain(model, feeds)
    row: dict[str, Any] = {"name": name, "left": {"input": left(model)}, "rel_err": {}, "ok": {}, "problems": {}}
    for tool, via in TOOLS.items():
        graph = attempt(tool, row["problems"], via, _copy(model))
        if graph is None:
            continue
        row["left"][tool] = left(graph)
        got = attempt(f"{tool} run", row["problems"], run_plain, graph, feeds)
        if got is not None:
            kept = parity(reference, got)
            row["rel_err"][tool], row["ok"][tool] = kept.rel, bool(kept)
    row["fold_s"] = fold_seconds(model, repeats)
    row["verdict"] = verdict(row)
    log(f"[{name}] left {row['left']}, rel err {row['rel_err']}, fold {row['fold_s'] * 1e3:.1f} ms"
        + (f", problems {row['problems']}" if row["problems"] else ""))
    return row


def verdict(row: dict[str, Any]) -> str:
    """"yes" when bnfold, with parity, leaves no more BNs and no more affine chains than the best other tool with
    parity leaves (each count against its own best); "NO (...)" with what it leaves more of; "n/a" when bnfold
    failed or lost parity."""
    if not row["ok"].get("bnfold"):
        return "n/a"
    rivals = [row["left"][t] for t in OTHERS if row["ok"].get(t)]
    if not rivals:
        return "yes"
    mine = row["left"]["bnfold"]
    best = Left(*(min(counts) for counts in zip(*rivals)))
    behind = [f"{field} {m} > {b}" for field, m, b in zip(Left._fields, mine, best) if m > b]
    return "yes" if not behind else f"NO ({', '.join(behind)})"


def left_rows(rows: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    cols = ["graph", *COLUMNS, "bnfold <= best", "fold ms"]
    out = []
    for r in rows:
        cells = [f"{r['left'][c].bn}/{r['left'][c].affine}" + ("" if c == "input" or r["ok"].get(c) else " !")
                 if c in r["left"] else "n/a" for c in COLUMNS]
        out.append([r["name"], *cells, r["verdict"], f"{r['fold_s'] * 1e3:.1f}"])
    return cols, out


def parity_rows(rows: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    cols = ["graph", *COLUMNS[1:]]
    out = []
    for r in rows:
        cells = [f"{r['rel_err'][c]:.1e}" + ("" if r["ok"][c] else " !") if c in r["rel_err"] else "n/a"
                 for c in COLUMNS[1:]]
        out.append([r["name"], *cells])
    return cols, out


def notes(rows: list[dict[str, Any]]) -> list[str]:
    out = [f"{r['name']}: {tool}: {msg}" for r in rows for tool, msg in r["problems"].items()]
    out += [f"{r['name']}: {tool} differs from the input graph: rel err {r['rel_err'][tool]:.2e}"
            for r in rows for tool, ok in r["ok"].items() if not ok]
    out += [f"{r['name']}: bnfold is behind: {r['verdict']}" for r in rows if r["verdict"].startswith("NO")]
    return out


def render(tables: list[tuple[str, tuple[list[str], list[list[str]]]]], lines: list[str], *, markdown: bool) -> str:
    """The titled tables, then the notes, as plain text or markdown."""
    table = markdown_table if markdown else plain_table
    text = "\n\n".join(f"{title}:\n\n{table(*t)}" for title, t in tables)
    bullet = "- " if markdown else "  - "
    return text + ("\n\nNotes:\n\n" + "\n".join(bullet + line for line in lines) if lines else "")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--entries", default="", help=f"comma-separated corpus entries (default: all: {', '.join(CORPUS)})")
    p.add_argument("--repeats", type=int, default=5, help="fold_graph runs per graph; the median is reported")
    p.add_argument("--markdown", default=None, help="write the tables and notes as markdown here")
    p.add_argument("--json", dest="json_path", default=None, help="write every figure here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    names = [n.strip() for n in args.entries.split(",") if n.strip()] or list(CORPUS)
    unknown = [n for n in names if n not in CORPUS]
    if unknown:
        raise SystemExit(f"--entries: unknown {', '.join(unknown)}; known: {', '.join(CORPUS)}")
    machine = {**machine_info(), "onnxoptimizer": onnxoptimizer.__version__}
    log(f"{machine}")
    start = time.perf_counter()
    rows = [bench_entry(n, args.repeats) for n in names]
    elapsed = time.perf_counter() - start
    tables = [(LEFT_TITLE, left_rows(rows)), (PARITY_TITLE, parity_rows(rows))]
    lines = notes(rows)
    print(render(tables, lines, markdown=False))
    print(f"\nMachine: {json.dumps(machine)}\nTotal: {elapsed:.1f}s")
    if args.markdown:
        Path(args.markdown).write_text(render(tables, lines, markdown=True) + "\n")
    if args.json_path:
        payload = {"machine": machine, "elapsed_s": elapsed,
                   "rows": [{**r, "left": {k: v._asdict() for k, v in r["left"].items()}} for r in rows]}
        Path(args.json_path).write_text(json.dumps(payload, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
