"""QLoRA step benchmark: peftc on an NF4 base against PEFT on bitsandbytes, eager and compiled,
side by side in one process on this CPU.

    python bench/qlora.py [--hidden 1024 --layers 4 --rank 16 --steps 5] [--json out.json]

Model: a Llama from config (hidden 1024, intermediate 2816, 4 layers, 16 heads, vocab 2000),
saved once and loaded twice with BitsAndBytesConfig(load_in_4bit, nf4, double quantization):
PEFT wraps one, `peftc.from_peft` reads the others as they are (the same NF4 codes). LoRA r=16
on all seven projections, inputs batch 4 × seq 128, loss on the model's own labels, AdamW.

Contenders: peftc eager; peftc compiled (`compile_for_training()`: Inductor, the dequantize
inlined as ATen and recomputed in the backward); PEFT+bnb eager; PEFT+bnb under
`torch.compile` (Inductor, default options), reported as failed with its error if it does not
compile. Contenders alternate one step each after a warm-up (which compiles); step time is
the median.

Memory: the base weights each holds (peftc: `base_weight_bytes(quantized_only=True)`; PEFT:
the bytes of bitsandbytes' packed weights and quant states), and the peak of what one
training step allocates above the memory at rest, read from torch.profiler's memory timeline
(CPU allocator events, so both contenders are measured the same way, in one process).
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

import torch  # noqa: E402

from bench.step_memory import adamw_step, peak_step_bytes  # noqa: E402
from rewrite.files import staged  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build(args, directory: Path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

    import peftc

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        vocab_size=args.vocab,
        use_cache=False,
    )
    LlamaForCausalLM(config).save_pretrained(directory / "base")
    bnb = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True
    )

    def load():
        return AutoModelForCausalLM.from_pretrained(
            directory / "base", quantization_config=bnb, device_map="cpu"
        )

    lora = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=TARGETS)
    theirs = get_peft_model(load(), lora)
    theirs.save_pretrained(directory / "adapter")
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    ours = [peftc.from_peft(load(), directory / "adapter", inputs) for _ in range(2)]
    theirs_again = get_peft_model(load(), lora)  # for torch.compile
    with torch.no_grad():  # the same non-zero adapter values in all
        for p in theirs.parameters():
            if p.requires_grad:
                p.normal_(0, 0.02, generator=g)
        values = sorted((n, p) for n, p in theirs.named_parameters() if p.requires_grad)
        for mine in ours:
            for (_, q), (_, theirs_p) in zip(
                sorted(mine.named_adapter_parameters().items()), values, strict=True
            ):
                q.copy_(theirs_p.reshape(q.shape))
        again = dict(theirs_again.named_parameters())
        for n, p in values:
            again[n].copy_(p)
    return ours[0].train(), ours[1].train(), theirs.train(), theirs_again.train(), inputs


def bnb_weight_bytes(model) -> int:
    """bitsandbytes' packed 4-bit weights and their quant states (absmax, nested state)."""
    total, seen = 0, set()
    for m in model.modules():
        state = getattr(getattr(m, "weight", None), "quant_state", None)
        if state is None or id(m.weight) in seen:  # PEFT's LoRA layer shows its base's weight
            continue
        seen.add(id(m.weight))
        total += m.weight.numel() * m.weight.element_size()
        for t in (state.absmax, state.code, getattr(state.state2, "absmax", None), state.offset):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
        if state.state2 is not None:
            total += state.state2.code.numel() * 4
    return total


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=2816)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--vocab", type=int, default=2000)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--json", default=str(ROOT / "bench/results/qlora_cpu.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        ours, ours_compiled, theirs, theirs_compiled, inputs = build(args, Path(tmp))
    with torch.no_grad():  # eval graphs: a training graph with labels returns no logits
        a, b = ours.eval()(**inputs).logits, theirs.eval()(**inputs).logits
    agree = float((a - b).abs().max())
    ours.train(), theirs.train()
    ours_compiled.compile_for_training()
    steps = {
        "peftc": adamw_step(ours, inputs),
        "peftc_compiled": adamw_step(ours_compiled, inputs),
        "peft_bnb": adamw_step(theirs, inputs),
    }
    compiled_theirs = torch.compile(theirs_compiled, backend="inductor")
    steps["peft_bnb_compiled"] = adamw_step(compiled_theirs, inputs, theirs_compiled)
    failed: dict[str, str] = {}
    losses, compile_s = {}, {}
    for name, step in list(steps.items()):
        start = time.perf_counter()
        try:
            losses[name] = step()  # warm-up (compiles)
        except Exception as e:  # noqa: BLE001  (a contender that does not compile is reported)
            failed[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
            del steps[name]
        compile_s[name] = time.perf_counter() - start
    times = {k: [] for k in steps}
    for _ in range(args.steps):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    peaks = {name: peak_step_bytes(step) for name, step in steps.items()}
    weights = {
        "peftc": ours.base_weight_bytes(quantized_only=True),
        "peftc_compiled": ours_compiled.base_weight_bytes(quantized_only=True),
        "peft_bnb": bnb_weight_bytes(theirs),
        "peft_bnb_compiled": bnb_weight_bytes(theirs_compiled),
    }
    fp32 = sum(4 * torch.Size(r.shape).numel() for r in ours.pipeline.quantized_weights.values())
    rows = {
        name: {
            "step_ms": 1e3 * statistics.median(times[name]),
            "peak_step_mb": peaks[name] / 2**20,
            "quantized_weight_mb": weights[name] / 2**20,
            "first_step_s": compile_s[name],
        }
        for name in steps
    }
    ratios = {
        f"{ours_name}/{theirs_name}": {
            k: rows[ours_name][k] / rows[theirs_name][k] for k in ("step_ms", "peak_step_mb")
        }
        for ours_name in ("peftc", "peftc_compiled")
        for theirs_name in ("peft_bnb", "peft_bnb_compiled")
        if ours_name in rows and theirs_name in rows
    }
    result = {
        "config": vars(args) | {"json": None},
        "torch": torch.__version__,
        "max_abs_logit_diff": agree,
        "quantized_weights_fp32_mb": fp32 / 2**20,
        "first_step_loss": losses,
        "rows": rows,
        "failed": failed,
        "ratios": ratios,
    }
    print(f"logits peftc vs PEFT+bnb: max |diff| {agree:.2e}")
    print(
        f"{'':18} {'step ms':>9} {'peak step MiB':>14} {'NF4 weights MiB':>16} {'1st step s':>11}"
    )
    for name, row in rows.items():
        print(
            f"{name:18} {row['step_ms']:9.1f} {row['peak_step_mb']:14.1f} "
            f"{row['quantized_weight_mb']:16.2f} {row['first_step_s']:11.1f}"
        )
    for name, why in failed.items():
        print(f"{name:18} failed: {why}")
    print(f"(the same weights in fp32: {fp32 / 2**20:.2f} MiB)")
    for pair, r in ratios.items():
        print(f"{pair}: " + ", ".join(f"{k} {v:.2f}x" for k, v in r.items()))
    with staged(args.json, make_parents=True) as path:
        path.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
