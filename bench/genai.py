"""onnxruntime-genai decode: peftc's KV-cache package against the model builder's.

    python bench/genai.py [--hidden 512 --layers 4 --heads 8 --kv-heads 2] [--rounds 5] [--json out.json]

Model: a Llama from config (GQA: 8 heads, 2 KV heads; vocab 2000) with LoRA r=16 on all seven
projection types, trained-looking values. peftc's package comes from `export_genai` (the
adapter merged); the peer is onnxruntime-genai's model builder (`python -m
onnxruntime_genai.models.builder -p fp32 -e cpu`) run on the same merged weights, saved as a
transformers directory. Both run in onnxruntime-genai, one generator per round, interleaved:
  prefill  append_tokens of a 24-token prompt (batch 1)
  decode   40 generate_next_token calls after it
Medians over the rounds. The tokens of the two packages are compared and reported.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import peftc  # noqa: E402
from bench.llama import TARGETS, token_batch  # noqa: E402
from lowering.genai import _merged_in, export_genai  # noqa: E402
from rewrite.files import write_atomic  # noqa: E402
from tests.models import save_word_tokenizer  # noqa: E402

PROMPT, NEW = 24, 40


def build(hidden: int, layers: int, heads: int, kv_heads: int, vocab: int) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=int(hidden * 2.6875),
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        vocab_size=vocab,
        max_position_embeddings=512,
    )
    return LlamaForCausalLM(config).eval()


def timed_generation(og, model, prompt: list[int]) -> tuple[float, float, list[int]]:
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + NEW, do_sample=False)
    generator = og.Generator(model, params)
    start = time.perf_counter()
    generator.append_tokens(np.asarray([prompt], dtype=np.int32))
    prefill = time.perf_counter() - start
    start = time.perf_counter()
    steps = 0
    while not generator.is_done():
        generator.generate_next_token()
        steps += 1
    decode = time.perf_counter() - start
    return prefill, decode / max(steps, 1) * NEW, [int(t) for t in generator.get_sequence(0)]


def main(argv: list[str] | None = None) -> int:
    import onnxruntime_genai as og

    p = argparse.ArgumentParser(description="peftc's genai package vs the model builder's")
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--vocab", type=int, default=2000)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    base = build(args.hidden, args.layers, args.heads, args.kv_heads, args.vocab)
    spec = {"adapters": [{"method": "lora", "targets": TARGETS, "rank": 16, "alpha": 32}]}
    adapted = peftc.compile(base, spec, token_batch(2, 32, vocab=args.vocab)).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in adapted.trainable_parameters():
            param.copy_(torch.randn(param.shape, generator=g) * 0.02)

    work = Path(tempfile.mkdtemp(prefix="peftc-genai-bench-"))
    ours, theirs, merged_dir = work / "peftc", work / "builder", work / "merged-hf"
    start = time.perf_counter()
    export_genai(adapted, ours, check=False)
    export_s = time.perf_counter() - start
    with _merged_in(adapted.pipeline, torch.float32):
        base.save_pretrained(str(merged_dir))  # the same merged weights for the builder
    save_word_tokenizer(merged_dir, args.vocab)  # the builder loads a tokenizer
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "onnxruntime_genai.models.builder", "-m", str(merged_dir),
         "-o", str(theirs), "-p", "fp32", "-e", "cpu"],
        check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    builder_s = time.perf_counter() - start

    prompt = token_batch(1, PROMPT, seed=3, vocab=args.vocab)["input_ids"][0].tolist()
    models = {"peftc": og.Model(str(ours)), "builder": og.Model(str(theirs))}
    times = {name: {"prefill": [], "decode": []} for name in models}
    tokens = {}
    for name, model in models.items():
        tokens[name] = timed_generation(og, model, prompt)[2]  # warm-up
    for _ in range(args.rounds):
        for name, model in models.items():
            prefill, decode, _ = timed_generation(og, model, prompt)
            times[name]["prefill"].append(prefill)
            times[name]["decode"].append(decode)
    result = {
        "model": f"llama hidden {args.hidden}, {args.layers} layers, {args.heads} heads "
        f"({args.kv_heads} KV), vocab {args.vocab}; LoRA r16 on all projections, merged",
        "prompt": PROMPT,
        "new_tokens": NEW,
        "rounds": args.rounds,
        "export_s": {"peftc": round(export_s, 1), "builder": round(builder_s, 1)},
        "same_tokens": tokens["peftc"] == tokens["builder"],
    }
    for name in models:
        result[name] = {k: round(statistics.median(v) * 1e3, 2) for k, v in times[name].items()}
    for phase in ("prefill", "decode"):
        result[f"{phase}_builder_over_peftc"] = round(
            result["builder"][phase] / result["peftc"][phase], 3
        )
    print(f"{'':8} {'prefill ms':>11} {'decode ms (40 tokens)':>22}")
    for name in models:
        print(f"{name:8} {result[name]['prefill']:>11.2f} {result[name]['decode']:>22.2f}")
    print(
        f"builder/peftc: prefill {result['prefill_builder_over_peftc']:.3f}x, decode "
        f"{result['decode_builder_over_peftc']:.3f}x (above 1: peftc faster); same tokens: "
        f"{result['same_tokens']}"
    )
    if args.json:
        write_atomic(args.json, json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
