"""Input gradients no one asked for: a compiled ViT step with and without the pixel gradient.

    python bench/input_grads.py [--hidden 384 --layers 6 --batch 8] [--rounds 15] [--json out.json]

Until #16's lever 4, every float input of a compiled training step entered the graph
requiring grad (so that a flip of `requires_grad` could not recompile, pytorch#141039), and
the backward computed the gradient of `pixel_values` through the patch embedding. Now each
requires-grad pattern gets its own compiled variant (lowering/inductor.py), so a plain image
batch costs no input-gradient work. The two contenders are the same compiled model, run
interleaved, medians over the rounds:
  no_input_grad   pixel_values as a dataloader gives them (today's step)
  input_grad      pixel_values requiring grad (what the step computed before)
Model: a ViT from config (image 224, patch 16), LoRA r16 on q_proj and v_proj, AdamW step.
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
from rewrite.files import write_atomic  # noqa: E402


def vit(hidden: int, layers: int) -> torch.nn.Module:
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(0)
    config = ViTConfig(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        intermediate_size=4 * hidden,
        image_size=224,
        patch_size=16,
        add_pooling_layer=False,
    )
    return ViTModel(config, add_pooling_layer=False)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="compiled ViT step with and without input grads")
    p.add_argument("--hidden", type=int, default=384)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    g = torch.Generator().manual_seed(0)
    pixels = torch.randn(args.batch, 3, 224, 224, generator=g)
    spec = {"adapters": [{"method": "lora", "targets": ["q_proj", "v_proj"], "rank": 16}]}
    adapted = peftc.compile(vit(args.hidden, args.layers), spec, (pixels[:2],)).train()
    adapted.compile_for_training()
    optimizer = torch.optim.AdamW(adapted.trainable_parameters(), lr=1e-4)

    def step(x: torch.Tensor) -> float:
        start = time.perf_counter()
        out = adapted(x)
        out.last_hidden_state.float().pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    contenders = {
        "no_input_grad": lambda: pixels,
        "input_grad": lambda: pixels.detach().requires_grad_(),
    }
    for make in contenders.values():  # compile each variant, then warm up
        for _ in range(2):
            step(make())
    times = {name: [] for name in contenders}
    for _ in range(args.rounds):
        for name, make in contenders.items():
            times[name].append(step(make()))
    result = {
        "model": f"ViT hidden {args.hidden}, {args.layers} layers, 224px patch 16, batch "
        f"{args.batch}; LoRA r16 on q_proj/v_proj; compiled (Inductor)",
        "rounds": args.rounds,
        **{name: round(statistics.median(t) * 1e3, 1) for name, t in times.items()},
    }
    result["no_input_grad_over_input_grad"] = round(
        result["no_input_grad"] / result["input_grad"], 3
    )
    for name in contenders:
        print(f"{name:14} {result[name]:8.1f} ms/step")
    print(f"no_input_grad / input_grad: {result['no_input_grad_over_input_grad']:.3f}x")
    if args.json:
        write_atomic(args.json, json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
