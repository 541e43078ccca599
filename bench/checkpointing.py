"""Activation checkpointing: none, the whole graph recomputed, or per block (recomputed whole,
or keeping the matmul outputs; lowering/checkpointing.py), side by side in one process on the
same model.

    python bench/checkpointing.py [--hidden 512 --layers 4 --batch 4 --seq 128 --rounds 5]
        [--compiled] [--json bench/results/checkpointing_cpu.json]

Model: a Llama from config (hidden 512, intermediate 1376, 4 layers, vocab 2000), LoRA r=16 on
all seven projections, the loss from labels, AdamW. Contenders alternate one step each after a
warm-up; step time is the median. Memory is the peak of what one step allocates above the
memory at rest, from torch.profiler's memory timeline (CPU allocator events: deterministic,
so it does not depend on what else the machine runs).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import peftc  # noqa: E402
from bench.step_memory import adamw_step, peak_step_bytes  # noqa: E402

SPEC = {"adapters": [{"method": "lora", "targets": "all-linear", "rank": 16, "alpha": 32}]}
MODES = ("none", "whole", "blocks", "blocks_save_matmuls")


def build(args, mode: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=args.hidden,
        intermediate_size=int(args.hidden * 2.6875),
        num_hidden_layers=args.layers,
        num_attention_heads=8,
        num_key_value_heads=4,
        vocab_size=2000,
        use_cache=False,
    )
    ids = torch.randint(0, 2000, (args.batch, args.seq), generator=torch.Generator().manual_seed(1))
    inputs = {"input_ids": ids, "labels": ids}
    adapted = peftc.compile(LlamaForCausalLM(config), SPEC, inputs).train()
    if mode.startswith("blocks"):
        policy = "save_matmuls" if mode.endswith("matmuls") else "recompute"
        adapted.gradient_checkpointing_enable(policy=policy)
    elif mode == "whole":
        adapted.pipeline.checkpointing = True  # the flat graph recomputed whole (Pipeline.run)
    if args.compiled:
        adapted.compile_for_training(activation_checkpointing=mode != "none")
        if mode == "whole":  # compiled whole-graph recompute: no blocks to cut
            from lowering.inductor import compile_program

            adapted.pipeline.runners[True] = compile_program(
                adapted.pipeline.program(True), activation_checkpointing=True
            )
    return adamw_step(adapted, inputs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--compiled", action="store_true", help="compile_for_training each")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    steps = {mode: build(args, mode) for mode in MODES}
    losses = {mode: step() for mode, step in steps.items()}  # warm-up (and compile)
    peaks = {mode: peak_step_bytes(step) for mode, step in steps.items()}
    times: dict[str, list[float]] = {mode: [] for mode in MODES}
    for _ in range(args.rounds):
        for mode, step in steps.items():
            start = time.perf_counter()
            step()
            times[mode].append(1000 * (time.perf_counter() - start))
    ms = {mode: statistics.median(t) for mode, t in times.items()}
    kind = "compiled" if args.compiled else "eager"
    print(
        f"activation checkpointing, {kind}, Llama hidden {args.hidden} x {args.layers} layers, "
        f"batch {args.batch} x seq {args.seq}, LoRA r=16 all-linear, median of {args.rounds}"
    )
    print(f"{'':22}{'ms/step':>10}{'peak step MiB':>16}{'first loss':>12}")
    for mode in MODES:
        print(f"{mode:22}{ms[mode]:>10.1f}{peaks[mode] / 2**20:>16.1f}{losses[mode]:>12.4f}")
    for mode in MODES[1:]:
        print(
            f"{mode} / none: step {ms[mode] / ms['none']:.2f}x, "
            f"peak memory {peaks[mode] / peaks['none']:.2f}x"
        )
    if args.json:
        out = {"args": vars(args) | {"json": str(args.json)}, "ms": ms, "peak_bytes": peaks}
        args.json.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
