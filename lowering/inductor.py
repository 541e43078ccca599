"""Training lowering: compile a program's graph with torch.compile's Inductor backend.

The graph is pure ATen with every tensor (base weights, buffers, adapter tensors, inputs) as
a graph input, so Dynamo captures it whole (`fullgraph=True`, no graph breaks) and loading
another adapter into the same tensors never recompiles. Inductor emits Triton kernels on a
GPU and C++ on CPU; which one follows from where the tensors live, through the same path.
Batch and sequence dimensions are compiled dynamic, so changing the sequence length inside
the traced range does not recompile.

Dynamo guards on each input's `requires_grad`, so a float input that sometimes needs a
gradient (a transformer block's hidden states: the first block's do not, the rest do, see
pytorch#141039) would recompile, and recompile again at each flip once the cache limit is
reached. Making such inputs always require grad avoids that but computes a gradient no one
asked for: a vision model's `pixel_values` paid for the patch-embedding backward at every
step. Here each pattern of which float inputs need a gradient (and grad mode) gets its own
compiled function, compiled once, the first time it is seen: the usual single pattern
compiles once and does no input-gradient work, and a block whose input flips compiles the
two variants once each and never recompiles. They are separate functions to Dynamo (each
its own code object, so its own cache), not recompiles of one.

A quantized base's dequantize nodes are custom ops in the program's graph (eager autograd
keeps recipes for them, rewrite/dequant.py); the compiled copy has them inlined as the codec's
ATen ops (`inline_dequantize`), so Inductor fuses each into one kernel beside its matmul and
recomputes it in the backward from the codes instead of saving the weight.

On CPU Inductor inlines a pointwise value into every kernel that reads it while the value's
body has fewer than `realize_cpu_opcount_threshold` (50) ops, rather than storing it once. A
gradient with several readers then has its producer recomputed in each: DoRA's output
gradient feeds the input-gradient matmuls and the magnitude's reduction over tokens, and
RoPE's backward (sin, cos) was computed for each (3.75 ms a layer against LoRA's 0.64 ms in
the bf16 step). peftc compiles with a threshold of 20, which stores such values once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from lowering.compile_cache import salted
from lowering.frozen_casts import FrozenCasts, castable_slots
from passes.fused_loss import compiled_step
from passes.pipeline import Pipeline
from rewrite.dequant import inline_dequantize
from rewrite.program import USER_INPUT, Program

# Inductor options for every training compile (see the module note); `mode` adds its own.
INDUCTOR_OPTIONS: dict[str, Any] = {"realize_cpu_opcount_threshold": 20}


def inductor_options(mode: str | None) -> dict[str, Any]:
    """What torch.compile's `mode` stands for, plus peftc's options: torch.compile takes a mode
    or options, not both."""
    from torch._inductor import list_mode_options

    return {**(list_mode_options(mode) if mode else {}), **INDUCTOR_OPTIONS}


def compile_program(
    program: Program,
    mode: str | None = None,
    dynamic: bool = True,
    activation_checkpointing: bool = False,
    graph: Callable[..., Any] | None = None,
    frozen_casts: bool = True,
) -> Callable[..., Any]:
    """`torch.compile(graph_module, backend="inductor", fullgraph=True)`, dynamic shapes.

    With `activation_checkpointing` the forward keeps only the graph's inputs and is
    recomputed in the backward (dropout masks replayed from the saved RNG state). `graph`
    is compiled in place of the graph module, over the same arguments (the per-block pieces
    of lowering/checkpointing.py). Under autocast, with `frozen_casts`, the frozen matmul
    weights enter as cast copies kept between steps (lowering/frozen_casts.py)."""
    if graph is not None:
        graph_module = graph
    else:  # a quantized base: its dequantize ops inlined as ATen, recomputed in the backward
        graph_module = inline_dequantize(program.graph_module, not activation_checkpointing)
    fn: Callable[..., Any] = graph_module
    if activation_checkpointing:

        def fn(*args: Any) -> Any:
            return torch.utils.checkpoint.checkpoint(graph_module, *args, use_reentrant=False)

    user_inputs = [i for i, slot in enumerate(program.slots) if slot.kind == USER_INPUT]
    options = inductor_options(mode)
    variants: dict[tuple[Any, ...], Callable[..., Any]] = {}
    frozen = FrozenCasts(castable_slots(program) if frozen_casts else [])

    def run(*args: Any) -> Any:
        args, cast_to = frozen.apply(args)
        key = (cast_to, *grad_pattern(args, user_inputs))
        compiled = variants.get(key)
        if compiled is None:
            compiled = variants[key] = salted(
                torch.compile(
                    _own_function(fn, f"peftc_step_{len(variants)}"),
                    backend="inductor",
                    fullgraph=True,
                    dynamic=dynamic,
                    options=options,
                )
            )
        with compiled_step():  # the fused loss's chunk passes run compiled too
            return compiled(*args)

    return run


def grad_pattern(args: tuple[Any, ...], positions: list[int]) -> tuple[bool, ...]:
    """Grad mode, then for each float tensor at `positions` whether it requires grad: what
    Dynamo would guard on, and so what picks the compiled variant (see the module note)."""
    if not torch.is_grad_enabled():
        return (False,)
    flags = [
        args[i].requires_grad
        for i in positions
        if isinstance(args[i], torch.Tensor) and args[i].is_floating_point()
    ]
    return (True, *flags)


def _own_function(fn: Callable[..., Any], name: str) -> Callable[..., Any]:
    """A function calling `fn`, with a code object of its own: Dynamo keeps its compiled
    code per code object, so each variant compiles on its own instead of recompiling one."""

    def call(*args: Any) -> Any:
        return fn(*args)

    call.__code__ = call.__code__.replace(co_name=name)
    return call


def compile_pipeline(
    pipeline: Pipeline,
    mode: str | None = None,
    dynamic: bool = True,
    activation_checkpointing: bool = False,
    frozen_casts: bool = True,
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
    program = pipeline.program(training=True)
    runner = compile_program(program, mode, dynamic, whole, blocks, frozen_casts)
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
