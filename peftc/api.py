"""The public entry points: compile a model with a spec, or load a PEFT adapter onto it."""

from __future__ import annotations

import os
from typing import Any

import torch

from cost_model.place import place
from passes.adapters.registry import methods
from peftc.adapted import AdaptedModel
from peftc.peft_format import read_config, spec_from_peft
from rewrite.program import Program
from rewrite.sites import SiteIndex, find_sites
from rewrite.spec import load_spec
from rewrite.trace import trace


def _compile_traced(
    model: torch.nn.Module,
    program: Program,
    sites: SiteIndex,
    spec: Any,
    example_inputs: Any,
    calibration: Any,
    debug: bool | None,
) -> AdaptedModel:
    registry = methods()
    spec = load_spec(spec, registry)
    plan = place(spec, sites, registry)
    return AdaptedModel(model, program, sites, plan, spec, example_inputs, calibration, debug)


def compile(
    model: torch.nn.Module,
    spec: Any,
    example_inputs: Any,
    *,
    calibration: Any = None,
    debug: bool | None = None,
) -> AdaptedModel:
    """Trace `model`, plan adapters from `spec`, and graft them into its graph.

    `spec` is a dict, YAML/JSON text or a path to a .yaml/.json file. `example_inputs` is a
    tuple of positional arguments or a dict of keyword arguments (input_ids, ...).
    The model is traced in its current mode; the other mode is traced on first use.
    """
    registry = methods()
    load_spec(spec, registry)  # fail on a bad spec before the (slower) trace
    program = trace(model, example_inputs, training=model.training)
    sites = find_sites(program)
    return _compile_traced(model, program, sites, spec, example_inputs, calibration, debug)


def from_peft(
    model: torch.nn.Module,
    adapter_dir: str | os.PathLike,
    example_inputs: Any,
    *,
    debug: bool | None = None,
) -> AdaptedModel:
    """Compile `model` with the spec equivalent to a PEFT adapter and load its weights."""
    config = read_config(adapter_dir)
    program = trace(model, example_inputs, training=model.training)
    sites = find_sites(program)
    spec = spec_from_peft(config, sites)
    adapted = _compile_traced(model, program, sites, spec, example_inputs, None, debug)
    adapted.load_adapter(adapter_dir)
    return adapted
