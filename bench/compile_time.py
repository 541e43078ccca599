"""Compile-time benchmark: peftc.compile against torch.export alone, side by side in one process.

    python bench/compile_time.py [--layers 32 --hidden 128] [--rounds 5] [--json out.json]

Model: a Llama from config (no download; hidden 128, 32 layers, intermediate 344, 4 heads,
vocab 2000), inputs batch 2 x seq 32, LoRA r=8 alpha=16 on all seven projection types (224
sites). `peftc.compile` is a torch.export of the model plus the rewrite, so the floor is that
export with the same example inputs, dynamic dims and mode. Contenders, one call each per
round in an order that rotates every round, medians over the rounds:
  export  torch.export.export alone (the call rewrite.trace makes)
  cold    peftc.compile with the snippet cache emptied first: what a compile pays when the
          process has not compiled this method at these shapes before
  warm    peftc.compile with the snippet cache as the previous compiles left it: a second
          compile of the same model in one process (tests, sweeps, notebooks)
Before the rounds, one export warms torch itself up, then the first compile in the process
is timed once and reported apart (with the export timed just before it).

Columns: wall and process-CPU seconds and their ratios to the export contender. On a busy
machine both drift by tens of percent between calls, so each compile also times the model
export inside it (torch.export.export is wrapped while a contender runs; adapter-snippet
exports are not counted there): `in-call` is a compile's wall time over its own model export,
the overhead measured within one call. `passes s` is the rewrite as the pass manager records
it; `snippets` the adapter snippets torch.export traced. Every call gets a fresh copy of the
model, made outside the clock (peftc.compile freezes the model it is given).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch.export import Dim  # noqa: E402

import peftc  # noqa: E402
from bench.llama import TARGETS, llama, token_batch  # noqa: E402
from rewrite.files import write_atomic  # noqa: E402
from rewrite.splice import SNIPPETS  # noqa: E402
from rewrite.trace import dynamic_dims  # noqa: E402

NAMES = {
    "export": "torch.export alone",
    "cold": "peftc.compile, snippet cache cold",
    "warm": "peftc.compile, snippet cache warm",
    "first": "first peftc.compile in the process",
}


def build_base(args: argparse.Namespace) -> torch.nn.Module:
    # peftc traces in the model's mode: train, as built from the config
    return llama(args.hidden, args.layers, args.heads, args.intermediate, args.seq).train()


def inputs(args: argparse.Namespace) -> dict[str, torch.Tensor]:
    return token_batch(args.batch, args.seq)


def export_alone(model: torch.nn.Module, x: dict[str, torch.Tensor]) -> Any:
    """The export that peftc's trace makes: keyword inputs, the same dims dynamic, non-strict."""
    dynamic = {name: {d: Dim.AUTO for d in dynamic_dims(t)} for name, t in x.items()}
    return torch.export.export(model, (), x, dynamic_shapes=dynamic, strict=False)


@dataclass
class Call:
    wall: float  # s
    cpu: float  # s, process CPU time
    model_export: float  # wall s inside torch.export.export of the model itself
    passes: float  # wall s in peftc's passes (insertion, fusion, cleanup), as recorded
    snippets: int  # adapter snippets exported during the call


@contextlib.contextmanager
def export_clock(model: torch.nn.Module, spent: list[float]) -> Iterator[None]:
    """Add the wall time of every torch.export.export of `model` to `spent[0]`."""
    real = torch.export.export

    def clocked(mod: torch.nn.Module, *a: Any, **k: Any) -> Any:
        if mod is not model:  # an adapter snippet: part of peftc's own cost
            return real(mod, *a, **k)
        start = time.perf_counter()
        try:
            return real(mod, *a, **k)
        finally:
            spent[0] += time.perf_counter() - start

    torch.export.export = clocked
    try:
        yield
    finally:
        torch.export.export = real


def timed(run: Callable[[torch.nn.Module], Any], base: torch.nn.Module) -> Call:
    """One call of `run` on a fresh copy of `base`. The copy is made and the previous call's
    garbage collected before the clock starts, so that no contender pays for another."""
    model = copy.deepcopy(base)
    gc.collect()
    spent = [0.0]
    exports = SNIPPETS.exports
    with export_clock(model, spent):
        wall, cpu = time.perf_counter(), time.process_time()
        result = run(model)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    passes = sum(r.seconds for r in getattr(result, "pass_records", []))
    return Call(wall, cpu, spent[0], passes, SNIPPETS.exports - exports)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="peftc.compile vs torch.export compile time")
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--intermediate", type=int, default=344)
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=32)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument(
        "--json",
        default=str(ROOT / "bench" / "results" / "compile_time_cpu.json"),
        help="write the results here (default: bench/results/compile_time_cpu.json)",
    )
    args = p.parse_args(argv)

    base = build_base(args)
    x = inputs(args)
    spec = {
        "adapters": [
            {"method": "lora", "targets": TARGETS, "rank": args.rank, "alpha": 2 * args.rank}
        ]
    }

    def compile_model(model: torch.nn.Module) -> Any:
        return peftc.compile(model, spec, x)

    def compile_cold(model: torch.nn.Module) -> Any:
        SNIPPETS.clear()  # drops a few small modules: nothing next to a compile
        return compile_model(model)

    runs = {
        "export": lambda model: export_alone(model, x),
        "cold": compile_cold,
        "warm": compile_model,
    }
    timed(runs["export"], base)  # torch's own one-time warm-up, paid by whichever runs first
    SNIPPETS.clear()
    first_export = timed(runs["export"], base)
    first = timed(compile_model, base)
    print(f"first compile in the process: {first.wall:.2f}s", file=sys.stderr)

    calls: dict[str, list[Call]] = {k: [] for k in runs}
    keys = list(runs)
    for r in range(args.rounds):
        order = keys[r % len(keys) :] + keys[: r % len(keys)]  # no contender always goes first
        for key in order:
            calls[key].append(timed(runs[key], base))
        print(
            f"round {r + 1}/{args.rounds}: "
            + ", ".join(f"{k} {calls[k][-1].wall:.2f}s" for k in keys),
            file=sys.stderr,
        )

    def med(key: str, field: str) -> float:
        return statistics.median(getattr(c, field) for c in calls[key])

    def in_call(c: Call) -> float:
        return c.wall / c.model_export

    rows: dict[str, dict[str, float]] = {}
    for k in keys:
        rows[k] = {
            "wall_s": med(k, "wall"),
            "cpu_s": med(k, "cpu"),
            "wall_vs_export": med(k, "wall") / med("export", "wall"),
            "cpu_vs_export": med(k, "cpu") / med("export", "cpu"),
            "in_call": statistics.median(in_call(c) for c in calls[k]),
            "passes_s": med(k, "passes"),
            "snippets": med(k, "snippets"),
        }
    rows["first"] = {
        "wall_s": first.wall,
        "cpu_s": first.cpu,
        "wall_vs_export": first.wall / first_export.wall,
        "cpu_vs_export": first.cpu / first_export.cpu,
        "in_call": in_call(first),
        "passes_s": first.passes,
        "snippets": first.snippets,
    }

    n_sites = args.layers * len(TARGETS)
    print(
        f"\ncompile time, cpu, Llama hidden {args.hidden} x {args.layers} layers, batch "
        f"{args.batch} x seq {args.seq}, LoRA r={args.rank} on {n_sites} sites, median of "
        f"{args.rounds} (first compile: one call, against the export just before it)"
    )
    head = ["wall s", "cpu s", "/export", "cpu/export", "in-call", "passes s", "snippets"]
    print(f"{'contender':36}" + "".join(f"{h:>11}" for h in head))
    for k, row in rows.items():
        print(
            f"{NAMES[k]:36}{row['wall_s']:11.2f}{row['cpu_s']:11.2f}"
            f"{row['wall_vs_export']:10.2f}x{row['cpu_vs_export']:10.2f}x"
            + (f"{row['in_call']:10.2f}x" if k != "export" else f"{'':11}")
            + f"{row['passes_s']:11.2f}{row['snippets']:11.0f}"
        )
    result = {
        "config": {k: v for k, v in vars(args).items() if k != "json"},
        "sites": n_sites,
        "rows": rows,
        "calls": {k: [asdict(c) for c in v] for k, v in calls.items()},
        "first": {"export": asdict(first_export), "compile": asdict(first)},
        "torch": torch.__version__,
    }
    write_atomic(args.json, json.dumps(result, indent=2))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
