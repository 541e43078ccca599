"""Activation checkpointing per block, with a policy that keeps the matmul outputs.

Recomputing the whole training graph in its backward (torch.utils.checkpoint around the flat
graph) keeps only the graph's inputs, but runs the whole forward twice and holds every
block's activations at once while that second forward runs. Per block is what the LLM
trainers do: the flat graph is cut into one piece per block (lowering/blocks.py) and each
piece is checkpointed on its own, so the backward recomputes one block at a time. Two
policies choose what a checkpointed block keeps:
- `recompute` (the default): only the block's inputs; the backward recomputes the block.
  The least memory (0.60x of no checkpointing on bench/checkpointing.py's Llama).
- `save_matmuls`: torch's selective activation checkpointing keeps the outputs of the
  expensive ops (matmuls, attention, convolutions) and recomputes only the elementwise ones
  around them: less recompute time, but in eager autograd those outputs are most of what a
  block saves, so it saves little memory.

`every_n_layers=n` checkpoints every n-th block and leaves the others as they are. A model
without repeated blocks falls back to checkpointing the whole graph.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from lowering.blocks import block_paths, split_blocks
from lowering.compile_cache import salted
from lowering.inductor import inductor_options
from passes.pipeline import Pipeline

aten = torch.ops.aten

# what a block saves for its backward instead of recomputing: the GEMM-bound ops
SAVED_OPS = frozenset(
    {
        aten.mm.default,
        aten.addmm.default,
        aten.bmm.default,
        aten.baddbmm.default,
        aten.convolution.default,
        aten._scaled_dot_product_flash_attention_for_cpu.default,
        aten._scaled_dot_product_efficient_attention.default,
        aten._scaled_dot_product_flash_attention.default,
        aten._scaled_dot_product_cudnn_attention.default,
    }
)


POLICIES = ("recompute", "save_matmuls")


def _keep_matmuls(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def _save_matmuls() -> Any:
    return create_selective_checkpoint_contexts(_keep_matmuls)


def check_policy(policy: str) -> str:
    if policy not in POLICIES:
        raise ValueError(
            f"activation checkpointing policy {policy!r}: use 'recompute' (each block "
            "recomputed whole, the least memory) or 'save_matmuls' (keep matmul and attention "
            "outputs, recompute the elementwise ops: less recompute time)"
        )
    return policy


def checkpointed_piece(piece: Callable[..., Any], policy: str = "recompute") -> Callable[..., Any]:
    """`piece` recomputed in the backward (non-reentrant; only where a backward will come):
    whole, or under the matmul policy."""
    extra = {"context_fn": _save_matmuls} if check_policy(policy) == "save_matmuls" else {}

    def run(*args: Any) -> Any:
        if not torch.is_grad_enabled():
            return piece(*args)
        return torch.utils.checkpoint.checkpoint(piece, *args, use_reentrant=False, **extra)

    return run


def wrap_piece(
    piece: torch.fx.GraphModule,
    compile: bool = False,
    checkpoint: bool = False,
    policy: str = "recompute",
) -> Callable[..., Any]:
    """What runs a block's training piece: the piece, checkpointed (under `policy`), compiled
    with Inductor (fullgraph, dynamic shapes), or both."""
    fn = checkpointed_piece(piece, policy) if checkpoint else piece
    if compile:
        fn = salted(
            torch.compile(
                fn, backend="inductor", fullgraph=True, dynamic=True, options=inductor_options(None)
            )
        )
    return fn


def per_block(
    pipeline: Pipeline, every_n_layers: int = 1, policy: str = "recompute"
) -> Callable[..., Any] | None:
    """The training graph as per-block pieces with every `every_n_layers`-th block
    checkpointed under `policy`: a callable over the graph module's arguments (what
    `Pipeline.runners` holds), or None when the graph has no blocks to cut."""
    if every_n_layers < 1:
        raise ValueError(f"every_n_layers must be 1 or more, got {every_n_layers}")
    check_policy(policy)
    paths = block_paths(pipeline.sites, pipeline.model)
    if not paths:
        return None
    top, blocks = split_blocks(pipeline.program(True), pipeline.model, pipeline.adapters, paths)
    for index, block in enumerate(blocks.values()):
        if index % every_n_layers == 0:
            block.runners["train"] = wrap_piece(
                block.pieces["train"], checkpoint=True, policy=policy
            )
    return top
