"""Attention forward + backward on CPU under bf16 autocast: which kernel is fastest, by length.

Three forms of one causal attention ([batch, 8 heads, seq, 64], a boolean mask as
transformers' sdpa path passes it), each compiled with Inductor (fullgraph, dynamic):
  flash    F.scaled_dot_product_attention on the bf16 inputs (what autocast runs)
  flash32  the same on the inputs upcast to fp32, the result cast back to bf16
  math     q·kᵀ in bf16, the masked softmax in fp32, p·v in bf16 (transformers' eager
           attention)
Prints ms per forward + backward (median) and each form's time over flash's.

    python bench/attention_cpu.py [--rounds 7] [--json PATH]
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
import torch.nn.functional as F  # noqa: E402

from rewrite.files import write_atomic  # noqa: E402

HEADS, HEAD_DIM = 8, 64
SHAPES = ((4, 128), (2, 512), (1, 1024), (1, 2048))  # (batch, seq): 512 to 2048 tokens
SCALE = HEAD_DIM**-0.5


def flash(q, k, v, mask):
    return F.scaled_dot_product_attention(q, k, v, mask, scale=SCALE)


def flash32(q, k, v, mask):
    with torch.autocast("cpu", enabled=False):
        wide = [t.float() for t in (q, k, v)]
        return F.scaled_dot_product_attention(*wide, mask, scale=SCALE).to(q.dtype)


def math(q, k, v, mask):
    scores = (q @ k.transpose(-1, -2) * SCALE).float().masked_fill(~mask, float("-inf"))
    return scores.softmax(-1).to(q.dtype) @ v


FORMS = {"flash": flash, "flash32": flash32, "math": math}


def time_form(fn, args, rounds: int) -> float:
    def step():
        out = fn(*args)
        out.backward(torch.ones_like(out))

    with torch.autocast("cpu", dtype=torch.bfloat16):
        for _ in range(2):
            step()
        times = []
        for _ in range(rounds):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    rows = []
    print(f"{'batch x seq':>12}" + "".join(f"{n:>10}" for n in FORMS) + "  (ms, fwd + bwd)")
    for batch, seq in SHAPES:
        mask = torch.ones(seq, seq, dtype=torch.bool).tril()[None, None]
        mask = mask.expand(batch, 1, seq, seq)
        qkv = [
            torch.randn(batch, HEADS, seq, HEAD_DIM, dtype=torch.bfloat16, requires_grad=True)
            for _ in range(3)
        ]
        ms = {
            name: time_form(
                torch.compile(fn, fullgraph=True, dynamic=True), (*qkv, mask), args.rounds
            )
            for name, fn in FORMS.items()
        }
        ratios = {f"{name}/flash": ms[name] / ms["flash"] for name in FORMS if name != "flash"}
        rows.append({"batch": batch, "seq": seq, "ms": ms, "ratios": ratios})
        cells = "".join(f"{ms[n]:>10.2f}" for n in FORMS)
        shown = "  ".join(f"{k} {v:.2f}x" for k, v in ratios.items())
        print(f"{f'{batch} x {seq}':>12}{cells}  {shown}")
    if args.json:
        result = {"rows": rows, "rounds": args.rounds, "torch": torch.__version__}
        write_atomic(Path(args.json), json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
