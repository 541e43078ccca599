"""Traces shared within a test run: a model built the same way is exported once per mode.

torch.export of whole models is most of the suite's time, and most tests build the same few
tiny models. `rewrite.trace.export_program` is wrapped so that a second trace of a model with
the same fingerprint (and the same inputs and mode) gets a copy of the first one's Program
instead of a new export. A Program holds no tensors (the state is passed at each call), so a
copy serves any instance built the same way.

The fingerprint is deliberately wide: each module's class, its forward function, and every
plain attribute (`repr` of sizes, flags, eps, config, hooks), every parameter and buffer
name with its shape, dtype and values' sum, and each example input's name, shape, dtype and
values. A model changed in any of those ways is traced again. Tests that check what tracing
itself does (its errors, its export counts) are marked `fresh_trace` and always export.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch

import rewrite.trace
from rewrite.program import Program

# nn.Module's bookkeeping, read separately (tensors) or not part of what the graph computes
_SKIP = {"_parameters", "_buffers", "_modules", "training", "_non_persistent_buffers_set"}


def _value(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return ("tensor", tuple(v.shape), v.dtype, float(v.detach().double().sum()))
    return repr(v)


def _module_key(m: torch.nn.Module) -> tuple:
    attrs = tuple(sorted((k, _value(v)) for k, v in vars(m).items() if k not in _SKIP))
    tensors = tuple(
        (n, _value(t)) for n, t in [*m._parameters.items(), *m._buffers.items()] if t is not None
    )
    return (type(m), type(m).forward, m.__dict__.get("forward"), attrs, tensors)


def fingerprint(model: torch.nn.Module, inputs: dict[str, Any], training: bool) -> tuple:
    modules = tuple((name, _module_key(m)) for name, m in model.named_modules())
    args = tuple(
        (
            k,
            tuple(v.shape),
            v.dtype,
            hash(v.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()),
        )
        if isinstance(v, torch.Tensor)
        else (k, repr(v))
        for k, v in inputs.items()
    )
    return (modules, args, training)


def copy_program(program: Program) -> Program:
    """A Program whose graph and slots can be rewritten without touching the cached one."""
    return dataclasses.replace(program.clone(), constants=dict(program.constants))


class SharedTraces:
    def __init__(self, export: Callable[..., Program]):
        self.export = export
        self.programs: dict[tuple, Program] = {}
        self.enabled = True
        self.hits = 0

    def __call__(self, model, inputs, dynamic_shapes, input_meta, training) -> Program:
        if not self.enabled:
            return self.export(model, inputs, dynamic_shapes, input_meta, training)
        try:
            key = (fingerprint(model, inputs, training), repr(dynamic_shapes))
            hash(key)
        except Exception:  # an attribute that cannot be compared: trace as usual
            return self.export(model, inputs, dynamic_shapes, input_meta, training)
        if key not in self.programs:
            program = self.export(model, inputs, dynamic_shapes, input_meta, training)
            self.programs[key] = copy_program(program)
            return program
        self.hits += 1
        return copy_program(self.programs[key])


SHARED = SharedTraces(rewrite.trace.export_program)


def install() -> None:
    rewrite.trace.export_program = SHARED
