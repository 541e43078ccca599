"""`peftc export`: a base model plus adapter directories -> a verified ONNX file.

    peftc export --model M --adapter DIR --out model.onnx [--dtype fp16] [--opset N]
    peftc export --model M --adapters A1 A2 A3 --multi --out model.onnx
    peftc export --model HF_DIR --adapter DIR --genai --out PACKAGE_DIR [--dtype fp16]
    peftc export --model HF_DIR --adapters A1 A2 --genai [--multi] --out PACKAGE_DIR

The first folds the adapter (a PEFT `save_pretrained` directory or one saved by peftc) into
the base weights; the second keeps LoRA adapters unmerged and stacked in one graph with an
extra `adapter_ids` input. Both check the file with onnxruntime before they return.
`--genai` writes a decoder LLM with a KV cache as an onnxruntime-genai package instead
(lowering/genai.py): one adapter merged; several as `.onnx_adapter` files for `og.Adapters`;
several with `--multi` mixed per row by `adapter_ids`. It is checked with onnxruntime-genai's
greedy search against transformers' `generate`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import peftc
from lowering.multi_adapter import export_multi
from lowering.onnx import DTYPES, export_merged
from peftc.commands.loading import example_inputs, load_model


def add_parser(sub) -> None:
    p = sub.add_parser(
        "export", help="merge an adapter into the base model and export a verified ONNX file"
    )
    p.add_argument("--model", required=True, help="HF model dir or module:factory")
    p.add_argument("--adapter", help="adapter directory (PEFT save_pretrained or peftc)")
    p.add_argument(
        "--adapters", nargs="+", metavar="DIR", help="several adapter directories (with --multi)"
    )
    p.add_argument(
        "--multi",
        action="store_true",
        help="one graph serving all --adapters, picked per example by an adapter_ids input",
    )
    p.add_argument(
        "--genai",
        action="store_true",
        help="an onnxruntime-genai package (KV-cache decoder, genai_config.json) in --out",
    )
    p.add_argument("--out", required=True, help="the .onnx file (with --genai: directory)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default: exporter's)")
    p.add_argument(
        "--static", action="store_true", help="fix batch and sequence sizes to the example's"
    )
    p.add_argument(
        "--no-ort-fusions",
        action="store_true",
        help="skip onnxruntime-specific fusions (keeps the graph to standard ONNX ops)",
    )


def _check_args(args: argparse.Namespace) -> None:
    if args.genai:
        if bool(args.adapter) == bool(args.adapters):
            raise ValueError("--genai takes one --adapter DIR, or several as --adapters DIR ...")
        if args.multi and args.dtype != "fp32":
            raise ValueError("--genai --multi exports fp32 only; drop --dtype")
        if args.static or args.opset is not None or args.no_ort_fusions:
            raise ValueError(
                "--genai exports dynamic shapes with the ORT fusions at the exporter's opset; "
                "drop --static, --opset and --no-ort-fusions"
            )
        return
    if args.multi:
        if args.adapter or not args.adapters:
            raise ValueError("--multi takes its adapters as --adapters DIR [DIR ...]")
        if args.dtype != "fp32":
            raise ValueError("--multi exports fp32 only; drop --dtype")
    elif args.adapters:
        raise ValueError(
            "--adapters needs --multi (one graph for many adapters); for one merged adapter "
            "use --adapter DIR"
        )
    elif not args.adapter:
        raise ValueError("give --adapter DIR (or --adapters DIR ... --multi)")


def run(args: argparse.Namespace) -> int:
    _check_args(args)
    model = load_model(args.model)
    inputs = example_inputs(model)
    fusions = not args.no_ort_fusions
    if args.genai:
        return _genai(args, model, inputs)
    if args.multi:
        adapters = [peftc.from_peft(model, d, inputs).eval() for d in args.adapters]
        report = export_multi(adapters, args.out, opset=args.opset, ort_fusions=fusions)
    else:
        adapted = peftc.from_peft(model, args.adapter, inputs).eval()
        print(adapted.summary())
        report = export_merged(
            adapted,
            args.out,
            dtype=args.dtype,
            opset=args.opset,
            dynamic=not args.static,
            ort_fusions=fusions,
        )
    print(report.summary())
    return 0


def _genai(args: argparse.Namespace, model, inputs) -> int:
    from lowering.genai import export_genai

    if args.adapter:
        adapted = peftc.from_peft(model, args.adapter, inputs).eval()
        print(adapted.summary())
        adapters, mode, names = adapted, "merged", None
    else:
        adapters = [peftc.from_peft(model, d, inputs).eval() for d in args.adapters]
        mode = "mixed" if args.multi else "inputs"
        names = [Path(d).resolve().name for d in args.adapters]
    report = export_genai(
        adapters, args.out, mode=mode, dtype=args.dtype, names=names, model_dir=args.model
    )
    print(report.summary())
    return 0
