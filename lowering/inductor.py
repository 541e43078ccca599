"""Training lowering: compile a program's graph with torch.compile's Inductor backend.

The graph is pure ATen with every tensor (base weights, buffers, adapter tensors, inputs) as
a graph input, so Dynamo captures it whole (`fullgraph=True`, no graph breaks) and loading
another adapter into the same tensors never recompiles. Inductor emits Triton kernels on a
GPU and C++ on CPU; which one follows from where the tensors live, through the same path.
Batch and sequence dimensions are compiled dynamic, so changing the sequence length inside
the traced range does not recompile.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from rewrite.program import Program


def compile_program(
    program: Program,
    mode: str | None = None,
    dynamic: bool = True,
    activation_checkpointing: bool = False,
) -> Callable[..., Any]:
    """`torch.compile(graph_module, backend="inductor", fullgraph=True)`, dynamic shapes.

    With `activation_checkpointing` the forward keeps only the graph's inputs and is
    recomputed in the backward (dropout masks replayed from the saved RNG state)."""
    fn: Callable[..., Any] = program.graph_module
    if activation_checkpointing:
        graph_module = program.graph_module

        def fn(*args: Any) -> Any:
            return torch.utils.checkpoint.checkpoint(graph_module, *args, use_reentrant=False)

    return torch.compile(fn, backend="inductor", fullgraph=True, dynamic=dynamic, mode=mode)


def compile(
    adapted: Any,
    mode: str | None = None,
    dynamic: bool = True,
    activation_checkpointing: bool = False,
) -> Any:
    """Compile an AdaptedModel's training graph in place and return it."""
    return adapted.compile_for_training(
        mode=mode, dynamic=dynamic, activation_checkpointing=activation_checkpointing
    )


def kernel_backend(device: torch.device | str) -> str:
    """The code Inductor generates for a device: Triton for CUDA, C++ otherwise."""
    return "triton" if torch.device(device).type == "cuda" else "cpp"
