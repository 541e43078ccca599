"""`peftc plan --model M --spec S --calib DATA`: where the adapters would go, and why.

Runs the placement alone (no adapters are built): PLoP NFN scores over the calibration data,
the chosen sites and ranks, the costs, and the reasons. `--calib` is a text file (one sample
per line, tokenized with the model directory's tokenizer, or `--tokenizer`) or a `.pt` file
holding a list of input batches (dicts of tensors, or tuples of positional tensors).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

import torch

from cost_model.place import place
from cost_model.placement_spec import parse_placement
from passes.adapters.registry import methods
from peftc.commands.loading import example_inputs, load_model
from rewrite.files import write_atomic
from rewrite.sites import find_sites
from rewrite.spec import load_spec
from rewrite.trace import bind_inputs, trace


def add_parser(sub) -> None:
    p = sub.add_parser(
        "plan",
        help="show where a spec's placement puts adapters, with NFN scores and costs",
        description="Plan adapter placement (PLoP NFN scores, budget solver, EVA ranks).",
    )
    p.add_argument("--model", required=True, help="HF model dir or module:factory")
    p.add_argument("--spec", required=True, help="spec file (.yaml/.json)")
    p.add_argument(
        "--calib", help="calibration data: a text file (one sample per line) or a .pt of batches"
    )
    p.add_argument("--tokenizer", help="tokenizer directory for a text --calib (default: --model)")
    p.add_argument("--batch-size", type=int, default=8, help="lines per batch for text --calib")
    p.add_argument("--max-length", type=int, default=128, help="tokens per line for text --calib")
    p.add_argument("--max-batches", type=int, default=None, help="use at most this many batches")
    p.add_argument("--tokens", type=int, default=1, help="tokens per step for the cost values")
    p.add_argument("--json", metavar="PATH", help="also write the plan as JSON")
    p.add_argument("--heatmap", metavar="PATH", help="draw layers x module types NFN (matplotlib)")


def text_batches(
    path: Path, tokenizer_dir: str, batch_size: int, max_length: int
) -> list[dict[str, torch.Tensor]]:
    """Tokenize the non-empty lines of a text file into padded batches with attention masks."""
    from transformers import AutoTokenizer

    if not os.path.isdir(tokenizer_dir):
        raise ValueError(
            f"a text --calib needs a tokenizer; {tokenizer_dir!r} is not a model directory. "
            "Pass --tokenizer DIR, or give --calib as a .pt file of token batches"
        )
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not lines:
        raise ValueError(f"--calib {path} has no non-empty lines")
    if batch_size < 1:
        raise ValueError(f"--batch-size must be positive, got {batch_size}")
    return [
        dict(
            tokenizer(
                lines[i : i + batch_size],
                padding=True,
                truncation=True,
                max_length=max_length,
                return_tensors="pt",
            )
        )
        for i in range(0, len(lines), batch_size)
    ]


def pt_batches(path: Path) -> list[Any]:
    data = torch.load(path, weights_only=True)
    if isinstance(data, dict) and all(isinstance(v, torch.Tensor) for v in data.values()):
        return [data]  # one batch of named inputs
    if isinstance(data, list | tuple) and data:
        return list(data)
    raise ValueError(
        f"--calib {path} must hold a list of batches (dicts of tensors or tuples of tensors), "
        f"or one dict of tensors; got {type(data).__name__}"
    )


def load_calibration(args: argparse.Namespace) -> list[Any]:
    path = Path(args.calib)
    if not path.is_file():
        raise FileNotFoundError(f"--calib {path} does not exist")
    if path.suffix in (".pt", ".pth"):
        batches = pt_batches(path)
    else:
        batches = text_batches(path, args.tokenizer or args.model, args.batch_size, args.max_length)
    return batches[: args.max_batches] if args.max_batches else batches


def _traceable(model: torch.nn.Module, batch: Any) -> bool:
    """Whether a batch can serve as example inputs (dynamic dims need size >= 2 to trace)."""
    from rewrite.trace import dynamic_dims

    return all(t.shape[d] >= 2 for t in bind_inputs(model, batch).values() for d in dynamic_dims(t))


def run(args: argparse.Namespace) -> int:
    model = load_model(args.model)
    registry = methods()
    spec = load_spec(args.spec, registry, parse_placement=parse_placement)  # parsed once
    batches = load_calibration(args) if args.calib else None
    if batches:
        bound = [bind_inputs(model, b) for b in batches]
        example = next((b for b in bound if _traceable(model, b)), None) or example_inputs(model)
    else:
        bound, example = None, example_inputs(model)
    program = trace(model, example, training=False)
    sites = find_sites(program)
    state = dict(model.named_parameters(remove_duplicate=False))
    state.update(model.named_buffers(remove_duplicate=False))
    plan = place(spec, sites, registry, program, state, bound)
    print(plan.table(tokens=args.tokens))
    if args.json:
        write_atomic(args.json, plan.to_json(tokens=args.tokens) + "\n")
        print(f"wrote {args.json}")
    if args.heatmap:
        from cost_model.heatmap import write_heatmap

        write_heatmap(plan, args.heatmap)
        print(f"wrote {args.heatmap}")
    return 0
