"""The public entry points: compile a model with a spec, or load a PEFT adapter onto it."""

from __future__ import annotations

import os
from typing import Any

import torch

from cost_model.place import place, wants_scores
from cost_model.placement_spec import parse_placement
from passes.adapters.registry import methods
from peftc.adapted import AdaptedModel
from peftc.peft_format import read_config, spec_from_peft
from rewrite.program import Program
from rewrite.sites import SiteIndex, find_sites
from rewrite.spec import load_spec
from rewrite.trace import bind_inputs, trace


def _compile_traced(
    model: torch.nn.Module,
    program: Program,
    sites: SiteIndex,
    spec: Any,
    example_inputs: Any,
    calibration: Any,
    debug: bool | None,
    loading: bool = False,
    fuse: bool = True,
) -> AdaptedModel:
    registry = methods()
    spec = load_spec(spec, registry)
    # bound once, so a one-shot iterable serves both the placement and the adapter init
    batches = None if calibration is None else [bind_inputs(model, b) for b in calibration]
    scoring = program
    if batches is not None and program.training and wants_scores(spec):
        scoring = trace(model, example_inputs, training=False)  # NFN/EVA without dropout
    state = dict(model.named_parameters(remove_duplicate=False))
    state.update(model.named_buffers(remove_duplicate=False))
    plan = place(spec, sites, registry, scoring, state, batches)
    return AdaptedModel(
        model,
        program,
        sites,
        plan,
        spec,
        example_inputs,
        batches,
        debug,
        loading=loading,
        fuse=fuse,
        eval_program=None if scoring.training else scoring,
    )


def compile(
    model: torch.nn.Module,
    spec: Any,
    example_inputs: Any,
    *,
    calibration: Any = None,
    debug: bool | None = None,
    fuse: bool = True,
) -> AdaptedModel:
    """Trace `model`, plan adapters from `spec`, and graft them into its graph.

    `spec` is a dict, YAML/JSON text or a path to a .yaml/.json file. `example_inputs` is a
    tuple of positional arguments or a dict of keyword arguments (input_ids, ...).
    The model is traced in its current mode; the other mode is traced on first use.
    `fuse=False` skips the fusion passes (sibling matmuls, scale folding).
    `calibration` is an iterable of inputs in the same form as `example_inputs` (a dict's
    attention_mask masks padding); a `placement:` section (PLoP NFN, EVA ranks) and
    data-initialised methods (eva, corda) read it.
    """
    registry = methods()
    parse_placement(load_spec(spec, registry).placement)  # fail on a bad spec before the trace
    program = trace(model, example_inputs, training=model.training)
    sites = find_sites(program)
    return _compile_traced(
        model, program, sites, spec, example_inputs, calibration, debug, fuse=fuse
    )


def from_peft(
    model: torch.nn.Module,
    adapter_dir: str | os.PathLike,
    example_inputs: Any,
    *,
    calibration: Any = None,
    debug: bool | None = None,
) -> AdaptedModel:
    """Compile `model` with the spec equivalent to a PEFT adapter and load its weights.

    `calibration` is needed only by checkpoints whose frozen part is rebuilt from data (a
    CorDA adapter saved without conversion); data-initialised tensors that the checkpoint
    holds are loaded, not recomputed."""
    config = read_config(adapter_dir)
    program = trace(model, example_inputs, training=model.training)
    sites = find_sites(program)
    spec = spec_from_peft(config, sites)
    adapted = _compile_traced(
        model, program, sites, spec, example_inputs, calibration, debug, loading=True
    )
    adapted.load_adapter(adapter_dir)
    return adapted
