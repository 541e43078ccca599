"""`peftc inspect --model M --spec S`: the table of adapted sites."""

from __future__ import annotations

import argparse

import peftc
from peftc.commands.loading import example_inputs, load_model


def add_parser(sub) -> None:
    p = sub.add_parser("inspect", help="show which sites got adapters and what the passes did")
    p.add_argument("--model", required=True, help="HF model dir or module:factory")
    p.add_argument("--spec", required=True, help="spec file (.yaml/.json)")


def run(args: argparse.Namespace) -> int:
    model = load_model(args.model)
    adapted = peftc.compile(model, args.spec, example_inputs(model))
    print(adapted.summary())
    return 0
