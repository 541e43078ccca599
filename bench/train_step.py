"""Training-step benchmark: peftc against PEFT, side by side in one process.

    python bench/train_step.py [--device cuda] [--hidden 512 --layers 4 --rank 16] [--vocab 2000]
                               [--json out.json]
    python bench/train_step.py --suite      # vocab 2000 and 32000, loss from labels, memory
    python bench/train_step.py --bf16       # every contender under bf16 autocast

Model: a Llama from config (hidden 512, 4 layers, intermediate 1376, 8 heads, vocab 2000),
inputs batch 4 × seq 128, LoRA r=16 alpha=32 on all seven projection types, AdamW. The
contenders run interleaved (one step each per round) after warm-up; the table reports
medians. Contenders:
  a  PEFT eager                 b  PEFT + torch.compile
  c  peftc compiled, no fusion  d  peftc compiled, fused
  e  floor: the compiled base model, forward + backward, no adapters, no weight gradients
     (input embeddings require grad, so the backward runs through every layer)
  f  peftc DoRA compiled (r=16)
  g  d with the optimizer step compiled too (torch.compile of AdamW.step)
  h  peftc PaCA compiled (r trained input columns per layer, r = --rank, alpha = 2·r)
  i  peftc MoRA compiled (rank = --rank: the LoRA-equivalent budget, one square matrix)
  j  peftc LoRMA compiled (r = --rank, pre + rri: W' = W + s·B·A·W each step)
  k  PEFT + torch.compile, the loss from `labels` inside the compiled model (HF's
     ForCausalLMLoss): the strongest PEFT configuration
  l  peftc compiled, fused, the loss from `labels` in its graph, fused_loss=False
  m  l with fused_loss=True (the default): head + cross-entropy as one chunked op
  n  d compiled for the traced shape only (dynamic=False; today's default is dynamic batch
     and sequence)
  o  d with frozen_casts=False: under --bf16, the frozen weights cast at every step, as
     autocast does, instead of once (d keeps the casts between steps)
  p  d with the LoRA scale on the adapter's output, `add(base, h·Bᵀ, alpha=s)`, instead of on
     the B weight (the fold_scale pass's scale_widening_weight rule turned off)
  q  f compiled with Inductor's own CPU realize threshold (50 ops) instead of peftc's 20
     (lowering/inductor.py: a gradient read by several kernels is stored, not recomputed)
`--attn eager` builds the model with transformers' eager attention (matmuls and a softmax)
instead of its default sdpa, for every contender (see bench/attention_cpu.py).
`--bf16` runs every step under `torch.autocast` in bf16 (weights and adapters stay fp32, the
matmuls run in bf16: the CPU's AVX512-BF16, a GPU's tensor cores). The method contenders h, i, j are fused like d, and compare against it (x/d in the ratios);
k, l and m compare against each other and b (x/m in the ratios).
`--suite` runs a, b, k, l, m at vocab 2000 and 32000 with `--memory` and writes one JSON
(bench/results/train_step_suite_cpu.json, or --json).
Peak memory: max allocated per step on GPU. On CPU (`--memory`), each contender runs alone in a
fresh child process whose large allocations are mmapped (MALLOC_MMAP_THRESHOLD_), so RSS
follows live tensors; the figure is the peak RSS during three steps above the RSS at rest
just before them (weights, optimizer state and compiled code excluded, as they are alike).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from unittest import mock

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import lowering.inductor  # noqa: E402
import peftc  # noqa: E402
from bench.llama import TARGETS, llama, token_batch  # noqa: E402
from passes.fuse import ScaleWideningWeightRule  # noqa: E402
from rewrite.files import write_atomic  # noqa: E402

NAMES = {
    "a": "PEFT eager",
    "b": "PEFT + torch.compile",
    "c": "peftc compiled, unfused",
    "d": "peftc compiled, fused",
    "e": "floor: compiled base fwd+bwd",
    "f": "peftc DoRA compiled",
    "g": "d + compiled optimizer step",
    "h": "peftc PaCA compiled",
    "i": "peftc MoRA compiled",
    "j": "peftc LoRMA compiled",
    "k": "PEFT + compile, loss from labels",
    "l": "peftc, labels, fused_loss=False",
    "m": "peftc, labels, fused_loss=True",
    "n": "d, static shapes",
    "o": "d, frozen weights cast each step",
    "p": "d, LoRA scale on the output",
    "q": "f, Inductor's realize threshold",
}
# The peftc contenders' methods (alpha 2·r where the method has one, as LoRA's).
METHOD = {
    "c": "lora",
    "d": "lora",
    "f": "dora",
    "g": "lora",
    "h": "paca",
    "i": "mora",
    "j": "lorma",
    "l": "lora",
    "m": "lora",
    "n": "lora",
    "o": "lora",
    "p": "lora",
    "q": "dora",
}
LABELS = {"k", "l", "m"}  # the model computes its loss from `labels`
NO_ALPHA = {"mora"}


def build_base(args):
    model = llama(
        args.hidden, args.layers, args.heads, args.intermediate, args.seq, vocab=args.vocab
    )
    model.set_attn_implementation(args.attn)
    return model.to(args.device)


def inputs(args):
    return token_batch(args.batch, args.seq, args.device, vocab=args.vocab)


def lm_loss(logits, ids):
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())


def make_contender(key, base, args, x):
    """A zero-argument callable that runs one training step of contender `key`."""
    from peft import LoraConfig, get_peft_model

    lora = {
        "r": args.rank,
        "lora_alpha": 2 * args.rank,
        "target_modules": TARGETS,
        "lora_dropout": 0.0,
    }
    spec_method = METHOD.get(key, "lora")
    rule = {"method": spec_method, "targets": TARGETS, "rank": args.rank}
    if spec_method not in NO_ALPHA:
        rule["alpha"] = 2 * args.rank
    spec = {"adapters": [rule]}
    if key in LABELS:
        x = {**x, "labels": x["input_ids"]}
    if key in ("a", "b", "k"):
        model = get_peft_model(copy.deepcopy(base), LoraConfig(**lora)).train()
        params = [p for p in model.parameters() if p.requires_grad]
        run = torch.compile(model, mode=args.mode) if key in ("b", "k") else model
    elif key in METHOD:
        # p: fold_scale without its scale_widening_weight rule, the scale left on the output
        with ablation(key == "p", ScaleWideningWeightRule, "matches", lambda self, node: False):
            model = peftc.compile(
                copy.deepcopy(base), spec, x, fuse=key != "c", fused_loss=key != "l"
            ).train()
        # q: compile_for_training without peftc's Inductor options
        with ablation(key == "q", lowering.inductor, "INDUCTOR_OPTIONS", {}):
            model.compile_for_training(mode=args.mode, dynamic=key != "n", frozen_casts=key != "o")
        params = model.trainable_parameters()
        run = model
    else:
        model = copy.deepcopy(base).train().requires_grad_(False)
        embed = model.get_input_embeddings()
        compiled = torch.compile(model, mode=args.mode)

        def floor_step():
            emb = embed(x["input_ids"]).detach().requires_grad_()
            with precision(args):
                logits = compiled(inputs_embeds=emb, attention_mask=x["attention_mask"]).logits
                loss = lm_loss(logits, x["input_ids"])
            loss.backward()

        return floor_step
    opt = torch.optim.AdamW(params, lr=torch.tensor(1e-4) if key == "g" else 1e-4)
    opt_step = torch.compile(opt.step, fullgraph=False) if key == "g" else opt.step

    def step():
        with precision(args):
            out = run(**x)
            loss = out.loss if key in LABELS else lm_loss(out.logits, x["input_ids"])
        loss.backward()
        opt_step()
        opt.zero_grad(set_to_none=True)

    return step


def ablation(active: bool, owner, name: str, value):
    """`owner.name` replaced by `value` while active (an ablation contender), else nothing."""
    return mock.patch.object(owner, name, value) if active else contextlib.nullcontext()


def precision(args):
    """bf16 autocast under `--bf16`, else nothing."""
    if not args.bf16:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(args.device).type, dtype=torch.bfloat16)


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure_memory_child(args, key):
    """Training-step memory (MiB) of contender `key`, alone in a fresh process (CPU)."""
    cmd = [sys.executable, __file__, "--only", key, "--device", args.device]
    for flag in ("hidden", "intermediate", "layers", "rank", "batch", "seq", "heads", "vocab"):
        cmd += [f"--{flag}", str(getattr(args, flag))]
    if args.mode:
        cmd += ["--mode", args.mode]
    if args.bf16:
        cmd += ["--bf16"]
    cmd += ["--attn", args.attn]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
    return float(out.stdout.strip().splitlines()[-1])


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def only(args):
    base = build_base(args)
    x = inputs(args)
    step = make_contender(args.only, base, args, x)
    for _ in range(3):  # compile and allocate optimizer state first
        step()
    gc.collect()
    rest = _rss()
    peak = [rest]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(0.0002)

    sampler = threading.Thread(target=sample)
    sampler.start()
    for _ in range(3):
        step()
    done.set()
    sampler.join()
    print((peak[0] - rest) / 2**20)


SUITE_VOCABS = (2000, 32000)
SUITE_CONTENDERS = "abklm"
SUITE_JSON = ROOT / "bench" / "results" / "train_step_suite_cpu.json"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="peftc vs PEFT training step")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--intermediate", type=int, default=1376)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--vocab", type=int, default=2000)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--contenders", default="abcdef")
    p.add_argument(
        "--mode",
        default=None,
        help="torch.compile mode for every compiled contender, e.g. max-autotune-no-cudagraphs",
    )
    p.add_argument(
        "--memory", action="store_true", help="CPU: peak RSS per contender (subprocesses)"
    )
    p.add_argument(
        "--suite",
        action="store_true",
        help=f"contenders {SUITE_CONTENDERS} at vocab {' and '.join(map(str, SUITE_VOCABS))}, "
        f"with --memory, into one JSON (default {SUITE_JSON.relative_to(ROOT)})",
    )
    p.add_argument("--bf16", action="store_true", help="every step under bf16 autocast")
    p.add_argument(
        "--attn",
        default="sdpa",
        choices=("sdpa", "eager"),
        help="transformers' attention for every contender: sdpa (its default, "
        "scaled_dot_product_attention) or eager (matmuls and a softmax)",
    )
    p.add_argument("--json", help="write the results here")
    p.add_argument("--only", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.only:
        only(args)
        return 0
    if not args.suite:
        result = measure(args)
        if args.json:
            write_atomic(args.json, json.dumps(result, indent=2))
            print(f"wrote {args.json}")
        return 0
    runs = {}
    for vocab in SUITE_VOCABS:
        run_args = argparse.Namespace(
            **{**vars(args), "vocab": vocab, "contenders": SUITE_CONTENDERS, "memory": True}
        )
        runs[str(vocab)] = measure(run_args)
    path = args.json or str(SUITE_JSON)
    write_atomic(path, json.dumps({"suite": runs, "torch": torch.__version__}, indent=2))
    print(f"wrote {path}")
    return 0


def measure(args) -> dict:
    """Run the contenders interleaved, print the table and ratios, return the results."""
    base = build_base(args)
    x = inputs(args)
    keys = list(args.contenders)
    steps, compile_s = {}, {}
    for key in keys:
        start = time.perf_counter()
        steps[key] = make_contender(key, base, args, x)
        for _ in range(args.warmup):
            steps[key]()
        sync(args.device)
        compile_s[key] = time.perf_counter() - start
        print(f"warmed up {key} ({NAMES[key]}) in {compile_s[key]:.1f}s", file=sys.stderr)
    times = {k: [] for k in keys}
    peak = {k: 0.0 for k in keys}
    for _ in range(args.rounds):
        for key in keys:
            if args.device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()
            sync(args.device)
            start = time.perf_counter()
            steps[key]()
            sync(args.device)
            times[key].append((time.perf_counter() - start) * 1e3)
            if args.device.startswith("cuda"):
                peak[key] = max(peak[key], torch.cuda.max_memory_allocated() / 2**20)
    del steps
    gc.collect()
    if args.memory and not args.device.startswith("cuda"):
        peak = {k: measure_memory_child(args, k) for k in keys}
    med = {k: statistics.median(v) for k, v in times.items()}
    mem_kind = "max allocated MiB" if args.device.startswith("cuda") else "step RSS MiB"
    print(
        f"\ntrain step, {args.device}, Llama hidden {args.hidden} x {args.layers} layers, "
        f"vocab {args.vocab}, batch {args.batch} x seq {args.seq}, LoRA r={args.rank}, "
        f"{'bf16 autocast' if args.bf16 else 'fp32'}, {args.attn} attention, "
        f"median of {args.rounds}"
    )
    print(f"{'':3}{'contender':34}{'ms/step':>10}{mem_kind:>20}")
    for k in keys:
        mem = f"{peak[k]:.0f}" if peak[k] else "-"
        print(f"{k:3}{NAMES[k]:34}{med[k]:10.1f}{mem:>20}")
    labels = {
        ("a", "d"): "a/d speed-up over PEFT eager",
        ("b", "d"): "b/d speed-up over PEFT compiled",
        ("d", "e"): "d/e cost over the floor",
        ("f", "d"): "f/d DoRA step / LoRA step",
        ("g", "d"): "g/d compiled optimizer step",
        ("h", "d"): "h/d PaCA step / LoRA step",
        ("i", "d"): "i/d MoRA step / LoRA step",
        ("j", "d"): "j/d LoRMA step / LoRA step",
        ("d", "n"): "d/n dynamic shapes / static",
        ("o", "d"): "o/d frozen casts kept between steps",
        ("p", "d"): "p/d LoRA scale on B, not the output",
        ("q", "f"): "q/f DoRA, peftc's realize threshold",
        ("a", "m"): "a/m speed-up over PEFT eager",
        ("b", "m"): "b/m speed-up over PEFT compiled",
        ("k", "m"): "k/m speed-up over PEFT compiled+labels",
        ("l", "m"): "l/m speed-up of the fused loss",
        ("k", "l"): "k/l unfused peftc over PEFT+labels",
    }
    ratios = {
        label: med[num] / med[den]
        for (num, den), label in labels.items()
        if num in med and den in med
    }
    peft = [k for k in "abk" if k in med]
    if "m" in med and peft:
        ratios["best PEFT / m"] = min(med[k] for k in peft) / med["m"]
    if peak.get("a") and peak.get("d"):
        ratios["peak memory d/a"] = peak["d"] / peak["a"]
    for num, den in (("m", "k"), ("m", "l"), ("l", "k")):
        if peak.get(num) and peak.get(den):
            ratios[f"peak memory {num}/{den}"] = peak[num] / peak[den]
    print("\nratios:")
    for name, value in ratios.items():
        print(f"  {name:40}{value:6.2f}x")
    return {
        "config": {k: v for k, v in vars(args).items() if k not in ("json", "only", "suite")},
        "median_ms": med,
        "all_ms": times,
        "peak_mib": peak,
        "warmup_s": compile_s,
        "ratios": ratios,
        "torch": torch.__version__,
    }


if __name__ == "__main__":
    sys.exit(main())
