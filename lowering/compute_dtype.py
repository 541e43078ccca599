"""The adapted graphs traced again with the parameters in a compute dtype.

FSDP2's mixed precision (`MixedPrecisionPolicy(param_dtype=torch.bfloat16)`) keeps fp32
parameters and runs each unit on bf16 copies of them. A graph traced on fp32 parameters has
its dtypes resolved for fp32 (an RMSNorm's cast back to its input dtype is a no-op there, an
attention mask is built in fp32), so it cannot run on bf16 copies. This traces the model
again with every parameter in the compute dtype (empty stand-ins, for the trace only; buffers
keep theirs, as FSDP2 leaves them) and inserts the same plan's adapters into it.
"""

from __future__ import annotations

import contextlib
import dataclasses

import torch

from passes.pipeline import Pipeline
from rewrite.passes import PassManager
from rewrite.program import Program
from rewrite.sites import find_sites, mark_output_head
from rewrite.swap import swapped_parameters
from rewrite.trace import trace


def parameters_as(model: torch.nn.Module, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """Every floating parameter of `model` replaced by an empty one in `dtype`, then restored."""

    def stand_in(param: torch.nn.Parameter) -> torch.Tensor | None:
        if not param.is_floating_point() or param.dtype == dtype:
            return None
        return torch.empty(param.shape, dtype=dtype, device=param.device)

    return swapped_parameters(model, stand_in)


def programs_in(pipeline: Pipeline, dtype: torch.dtype) -> dict[bool, Program]:
    """The training and eval graphs of `pipeline`'s plan, traced with parameters in `dtype`
    (floating example inputs too, as FSDP2 casts a unit's inputs)."""
    inputs = {
        k: v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v
        for k, v in pipeline.example_inputs.items()
    }
    out = {}
    with parameters_as(pipeline.model, dtype):
        for training in (True, False):
            program = trace(pipeline.model, inputs, training, pipeline.dynamic_shapes)
            sites = mark_output_head(find_sites(program), pipeline.model)
            assignments = [dataclasses.replace(a, site=sites[a.site.path]) for a in pipeline.plan]
            PassManager(pipeline.adapt_passes(program, sites, assignments)).run(program)
            out[training] = program
    return out
