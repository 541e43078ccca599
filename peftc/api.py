"""The public entry points: compile a model with a spec, or load a PEFT adapter onto it."""

from __future__ import annotations

import os
from typing import Any

import torch

from passes.pipeline import Pipeline
from peftc.adapted import AdaptedModel
from peftc.peft_format import read_config, spec_from_peft


def compile(
    model: torch.nn.Module,
    spec: Any,
    example_inputs: Any,
    *,
    calibration: Any = None,
    debug: bool | None = None,
    fuse: bool = True,
    dynamic_shapes: Any = None,
    quantize: Any = None,
    fused_loss: bool = True,
) -> AdaptedModel:
    """Trace `model`, plan adapters from `spec`, and graft them into its graph.

    `quantize` ("nf4", "int8" or a mapping, as the spec's `quantize:` section) stores the
    frozen base weights quantized (QLoRA); a model with bitsandbytes layers is read as it is.

    `spec` is a dict, YAML/JSON text or a path to a .yaml/.json file. `example_inputs` is a
    tuple of positional arguments or a dict of keyword arguments (input_ids, ...).
    The model is traced in its current mode; the other mode is traced on first use, or is
    the eval trace that a data-driven placement or adapter init already read.
    `fuse=False` skips the fusion passes (sibling matmuls, scale folding).
    `fused_loss` (default True): where the training graph computes the loss from `labels`
    (example inputs with `labels`), the output head and the cross-entropy run as one chunked
    op that never forms the [tokens, vocab] logits, and training-mode calls return
    `logits=None` with the loss; eval mode returns logits as before. `fused_loss=False` keeps
    the logits (and their memory) in training too.
    `dynamic_shapes` is torch.export's, by input name (`{"x": {2: Dim("time")}}`); inputs it
    leaves out keep batch, sequence, and the free dims of rank-3 float inputs dynamic, as far
    as the model allows. The ONNX export and its verification use the dims the trace resolved.
    `calibration` is an iterable of inputs in the same form as `example_inputs` (a dict's
    attention_mask masks padding); a `placement:` section (PLoP NFN, EVA ranks) and
    data-initialised methods (eva, corda) read it.
    """
    # the spec, placement section included, is parsed once, first: a bad spec fails before
    # anything is traced
    pipeline = Pipeline(
        model,
        example_inputs,
        spec,
        debug=debug,
        fuse=fuse,
        dynamic_shapes=dynamic_shapes,
        quantize=quantize,
        fused_loss=fused_loss,
    )
    pipeline.build(calibration)
    return AdaptedModel(pipeline)


def from_peft(
    model: torch.nn.Module,
    adapter_dir: str | os.PathLike,
    example_inputs: Any,
    *,
    calibration: Any = None,
    debug: bool | None = None,
    dynamic_shapes: Any = None,
    quantize: Any = None,
    fused_loss: bool = True,
) -> AdaptedModel:
    """Compile `model` with the spec equivalent to a PEFT adapter and load its weights.

    `quantize` and `fused_loss` as in `compile`; a model with bitsandbytes layers (QLoRA) is
    read as it is.

    `calibration` is needed only by checkpoints whose frozen part is rebuilt from data (a
    CorDA adapter saved without conversion); data-initialised tensors that the checkpoint
    holds are loaded, not recomputed."""
    config = read_config(adapter_dir)
    pipeline = Pipeline(
        model,
        example_inputs,
        debug=debug,
        dynamic_shapes=dynamic_shapes,
        quantize=quantize,
        fused_loss=fused_loss,
    )
    pipeline.parse_spec(spec_from_peft(config, pipeline.sites))  # the spec follows the sites
    pipeline.build(calibration, loading=True)
    adapted = AdaptedModel(pipeline)
    adapted.load_adapter(adapter_dir)
    return adapted
