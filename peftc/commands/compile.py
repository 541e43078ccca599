"""`peftc compile --model M --spec S --out DIR`: adapt a model and save its (initial) adapter."""

from __future__ import annotations

import argparse

import peftc
from peftc.commands.loading import example_inputs, load_model


def add_parser(sub) -> None:
    p = sub.add_parser("compile", help="adapt a model from a spec and save the adapter")
    p.add_argument("--model", required=True, help="HF model dir or module:factory")
    p.add_argument("--spec", required=True, help="spec file (.yaml/.json)")
    p.add_argument("--out", required=True, help="directory for the PEFT-format adapter")
    p.add_argument("--debug", action="store_true", help="print each pass's graph diff")


def run(args: argparse.Namespace) -> int:
    model = load_model(args.model)
    adapted = peftc.compile(model, args.spec, example_inputs(model), debug=args.debug or None)
    print(adapted.summary())
    adapted.save_adapter(args.out)
    print(f"saved adapter to {args.out}")
    return 0
