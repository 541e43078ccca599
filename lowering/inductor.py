"""Training lowering: compile a program's graph with torch.compile's Inductor backend.

The graph is pure ATen with every tensor (base weights, buffers, adapter tensors, inputs) as
a graph input, so Dynamo captures it whole (`fullgraph=True`, no graph breaks) and loading
another adapter into the same tensors never recompiles. Inductor emits Triton kernels on a
GPU and C++ on CPU; which one follows from where the tensors live, through the same path.
Batch and sequence dimensions are compiled dynamic, so changing the sequence length inside
the traced range does not recompile.

Dynamo guards on each input's `requires_grad`, so a float input that sometimes needs a
gradient (a transformer block's hidden states: the first block's do not, the rest do, see
pytorch#141039) would compile twice. Here such inputs always enter the compiled graph
requiring grad; when the caller's tensor did not, it is a detached alias whose gradient is
dropped. The price is computing that input's gradient in the backward. Under
`torch.no_grad()` nothing is changed.

A quantized base's dequantize nodes are custom ops in the program's graph (eager autograd
keeps recipes for them, rewrite/dequant.py); the compiled copy has them inlined as the codec's
ATen ops (`inline_dequantize`), so Inductor fuses each into one kernel beside its matmul and
recomputes it in the backward from the codes instead of saving the weight.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from passes.pipeline import Pipeline
from rewrite.dequant import inline_dequantize
from rewrite.program import USER_INPUT, Program


def compile_program(
    program: Program,
    mode: str | None = None,
    dynamic: bool = True,
    activation_checkpointing: bool = False,
    graph: Callable[..., Any] | None = None,
) -> Callable[..., Any]:
    """`torch.compile(graph_module, backend="inductor", fullgraph=True)`, dynamic shapes.

    With `activation_checkpointing` the forward keeps only the graph's inputs and is
    recomputed in the backward (dropout masks replayed from the saved RNG state). `graph`
    is compiled in place of the graph module, over the same arguments (the per-block pieces
    of lowering/checkpointing.py)."""
    if graph is not None:
        graph_module = graph
    else:  # a quantized base: its dequantize ops inlined as ATen, recomputed in the backward
        graph_module = inline_dequantize(program.graph_module, not activation_checkpointing)
    fn: Callable[..., Any] = graph_module
    if activation_checkpointing:

        def fn(*args: Any) -> Any:
            return torch.utils.checkpoint.checkpoint(graph_module, *args, use_reentrant=False)

    compiled = torch.compile(fn, backend="inductor", fullgraph=True, dynamic=dynamic, mode=mode)
    user_inputs = [i for i, slot in enumerate(program.slots) if slot.kind == USER_INPUT]

    def run(*args: Any) -> Any:
        return compiled(*_inputs_requiring_grad(args, user_inputs))

    return run


def _inputs_requiring_grad(args: tuple[Any, ...], positions: list[int]) -> tuple[Any, ...]:
    """`args` with every float tensor at `positions` requiring grad (see the module note)."""
    if not torch.is_grad_enabled():
        return args
    out = list(args)
    for i in positions:
        value = out[i]
        if (
            isinstance(value, torch.Tensor)
            and value.is_floating_point()
            and not value.requires_grad
        ):
            out[i] = value.detach().requires_grad_()
    return tuple(out)


def compile_pipeline(
    pipeline: Pipeline,
    mode: str | None = None,
    dynamic: bool = True,
    activation_checkpointing: bool = False,
) -> Callable[..., Any]:
    """Compile a pipeline's training graph and make it the one training-mode calls run
    (`Pipeline.runners`); returns the compiled callable. With `activation_checkpointing`
    each block is checkpointed on its own (every `pipeline.checkpoint_every`-th, under
    `pipeline.checkpoint_policy`; the whole graph where it has no blocks), see
    lowering/checkpointing.py."""
    from lowering.checkpointing import per_block

    blocks = (
        per_block(pipeline, pipeline.checkpoint_every, pipeline.checkpoint_policy)
        if activation_checkpointing
        else None
    )
    whole = activation_checkpointing and blocks is None
    runner = compile_program(pipeline.program(training=True), mode, dynamic, whole, blocks)
    pipeline.runners[True] = runner
    return runner


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
