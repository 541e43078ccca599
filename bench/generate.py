"""Decode benchmark: adapted.generate against PeftModel.generate and the merged HF model.

    python bench/generate.py [--device cuda] [--hidden 256 --layers 4] [--rounds 5] [--json out.json]

Model: a Llama from config (hidden 256, 4 layers, intermediate 688, 4 heads, vocab 2000),
LoRA r=16 alpha=32 on all seven projection types with trained-looking values. Prompt batch
2 x 16 tokens, greedy, 64 new tokens, KV cache. The contenders run interleaved, one call each
per round after a warm-up call, medians over the rounds; all three must give the same tokens.
  peft    PeftModel.generate (the oracle's own loop, LoRA layers in the modules)
  peftc   adapted.generate (transformers' loop, the adapters as forward hooks)
  merged  the base model's generate with the merged weights (no adapter cost: the floor)
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import peftc  # noqa: E402
from bench.llama import TARGETS, llama, token_batch  # noqa: E402
from passes.merge import merged_weights  # noqa: E402
from rewrite.files import write_atomic  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    from peft import PeftModel

    p = argparse.ArgumentParser(description="adapted.generate vs PEFT vs merged decode speed")
    p.add_argument("--device", default="cpu")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--json", default=str(ROOT / "bench" / "results" / "generate_cpu.json"))
    args = p.parse_args(argv)

    base = llama(args.hidden, args.layers, heads=4, use_cache=True).eval().to(args.device)
    prompt = token_batch(2, 16, args.device, seed=1)
    spec = {"adapters": [{"method": "lora", "targets": TARGETS, "rank": 16, "alpha": 32}]}
    adapted = peftc.compile(copy.deepcopy(base), spec, prompt)
    with torch.no_grad():
        for t in adapted.trainable_parameters():
            t.normal_(std=0.02, generator=torch.Generator().manual_seed(2))
    with tempfile.TemporaryDirectory() as tmp:
        adapted.save_adapter(tmp)
        peft_model = PeftModel.from_pretrained(copy.deepcopy(base), tmp).eval()
    merged = copy.deepcopy(base)
    weights = merged_weights(adapted.plan.assignments, adapted.state())
    with torch.no_grad():
        for a in adapted.plan:
            merged.get_submodule(a.path).weight.copy_(weights[a.path])

    gen = {"max_new_tokens": args.new_tokens, "min_new_tokens": args.new_tokens, "pad_token_id": 0}
    contenders = {
        "peft": lambda: peft_model.generate(**prompt, **gen),
        "peftc": lambda: adapted.generate(**prompt, **gen),
        "merged": lambda: merged.generate(**prompt, **gen),
    }
    tokens = {name: run() for name, run in contenders.items()}  # warm-up, and the tokens
    same = all(torch.equal(tokens["peft"], t) for t in tokens.values())
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(args.rounds):
        for name, run in contenders.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    new = 2 * args.new_tokens
    rate = {name: new / statistics.median(t) for name, t in times.items()}
    print(
        f"decode, {args.device}, Llama hidden {args.hidden} x {args.layers} layers, LoRA r=16 on "
        f"{len(adapted.plan)} sites, batch 2, {args.new_tokens} new tokens, greedy, median of "
        f"{args.rounds}; same tokens: {same}"
    )
    for name in contenders:
        print(f"  {name:<7} {rate[name]:8.1f} tokens/s   {rate[name] / rate['peft']:.2f}x peft")
    write_atomic(
        args.json,
        json.dumps({"args": vars(args), "tokens_per_s": rate, "same_tokens": same}, indent=2),
    )
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
