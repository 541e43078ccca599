"""Training an adapted model on several processes, on torch.distributed's own engines.

`replicate(adapted)` wraps the model in PyTorch's DistributedDataParallel: every rank holds
the whole frozen base and the adapters; only the adapters have gradients, so only they are
all-reduced (averaged) after each backward.

`fully_shard(adapted)` is FSDP2: the flat training graph is cut into one piece per decoder
block (lowering/blocks.py), each block's base weights *and* adapter tensors form one FSDP2
unit, sharded across the ranks and gathered only while that block runs (forward and
backward); the rest (embeddings, final norm, head, adapter tensors shared by every site) is
the root unit. Adapters are sharded with their block rather than replicated: FSDP2 keeps
frozen and trainable tensors in one unit, mixed precision then casts both alike, and the
optimizer state is sharded too. Adapter gradients are reduce-scattered (averaged).

The process group comes from `mesh` (a 1-D DeviceMesh) or is the default one; gloo runs it on
CPUs, NCCL on GPUs. `save_adapter(model, directory)` is collective: every rank calls it (a
sharded adapter is gathered whole first), rank 0 writes the one file set in PEFT's format
through the same staged write as a single process, and the others wait for it.
`load_adapter(model, directory)` loads on every rank, into replicated or sharded tensors.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.nn.parallel import DistributedDataParallel

from lowering.blocks import Block, block_paths, split_blocks
from lowering.checkpointing import wrap_piece
from lowering.compute_dtype import programs_in
from passes.pipeline import pipeline_of
from passes.quantize import state_name
from rewrite.dequant import recompute_dequantized
from rewrite.program import Program
from rewrite.trace import bind_call, check_inputs


def _group(mesh: Any) -> Any:
    if mesh is None:
        return None  # the default process group
    if mesh.ndim != 1:
        raise ValueError(f"replicate takes a 1-D DeviceMesh, got one of {mesh.ndim} dims")
    return mesh.get_group()


def _require_group() -> None:
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "no torch.distributed process group: call torch.distributed.init_process_group "
            "(gloo on CPU, nccl on GPU) first, e.g. under torchrun"
        )


def adapted_of(model: torch.nn.Module) -> Any:
    """The AdaptedModel inside a DDP or FSDP2 wrapper (or the model itself)."""
    if isinstance(model, DistributedDataParallel):
        return model.module
    return model.adapted if isinstance(model, ShardedModel) else model


def replicate(adapted: torch.nn.Module, mesh: Any = None, **ddp_kwargs: Any) -> torch.nn.Module:
    """`adapted` wrapped for data-parallel training: call it and step an optimizer over
    `adapted.trainable_parameters()` as on one process. Ranks start from rank 0's adapter
    values (DDP broadcasts them)."""
    _require_group()
    if not adapted.trainable_parameters():
        raise ValueError("the model has no trainable adapter tensors to train in parallel")
    return DistributedDataParallel(adapted, process_group=_group(mesh), **ddp_kwargs)


def save_adapter(model: torch.nn.Module, directory: str) -> None:
    """Every rank calls this: sharded adapter tensors are gathered whole on every rank, rank 0
    writes the adapter, then all ranks go on together."""
    _require_group()
    adapted = adapted_of(model)
    whole = {name: _whole(t) for name, t in adapted.named_adapter_parameters().items()}
    if dist.get_rank() == 0:
        from peftc.peft_format import save_adapter as write

        write(_WithState(adapted.pipeline, whole), directory)
    dist.barrier()


def load_adapter(model: torch.nn.Module, directory: str) -> None:
    """Every rank calls this: each reads the checkpoint and keeps its own shard of every
    sharded tensor (the whole tensor where it is replicated)."""
    _require_group()
    adapted = adapted_of(model)
    params = adapted.named_adapter_parameters()
    whole = {name: torch.zeros(p.shape, dtype=p.dtype) for name, p in params.items()}
    from peftc.peft_format import load_adapter as read

    read(_WithState(adapted.pipeline, whole), directory)
    with torch.no_grad():
        for name, param in params.items():
            value = whole[name].to(param.device)
            if isinstance(param, DTensor):
                value = distribute_tensor(value, param.device_mesh, param.placements)
            param.copy_(value)
    dist.barrier()


def _whole(tensor: torch.Tensor) -> torch.Tensor:
    """A tensor in full (a collective for a sharded one), detached, on the CPU."""
    if isinstance(tensor, DTensor):
        tensor = tensor.full_tensor()
    return tensor.detach().cpu()


class _WithState:
    """The pipeline as the checkpoint code reads it, with the adapter tensors swapped for
    whole, plain ones (sharded tensors cannot be written or loaded piecewise there)."""

    def __init__(self, pipeline: Any, adapters: dict[str, torch.Tensor]):
        self._pipeline = pipeline
        self._adapters = adapters

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pipeline, name)

    def state(self) -> dict[str, torch.Tensor]:
        return {**self._pipeline.base_state(), **self._adapters}


# -- FSDP2 ------------------------------------------------------------------------------------


class ShardedModel(torch.nn.Module):
    """An adapted model under FSDP2, called like the adapted model; step an optimizer over
    `trainable_parameters()` (sharded tensors). Its children are the adapted model (the root
    unit: what no block holds) and the blocks (one unit each)."""

    def __init__(
        self,
        adapted: torch.nn.Module,
        blocks: dict[str, Block],
        programs: dict[bool, Program],
        tops: dict[bool, torch.fx.GraphModule],
    ):
        super().__init__()
        self.adapted = adapted
        self.blocks = torch.nn.ModuleList(blocks.values())
        # per mode: the flat graph (its slots and outputs) and its top graph over the blocks;
        # kept out of the module tree (the top graph holds the blocks a second time)
        self._programs = programs
        self._tops = tops

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        pipeline = self.adapted.pipeline
        inputs = bind_call(pipeline.model, args, kwargs)
        program = self._programs[self.training]
        check_inputs(program, inputs)
        if self.training:
            pipeline.advance_step_counters()
        # a quantized base: autograd keeps how to dequantize each weight, not the weight
        recipes = recompute_dequantized() if pipeline.quantized_weights else nullcontext()
        with recipes:
            return program.run(pipeline.state(), inputs, self._tops[self.training])

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return self.adapted.trainable_parameters()


def fully_shard(
    adapted: torch.nn.Module,
    mesh: Any = None,
    *,
    blocks: list[str] | None = None,
    activation_checkpointing: bool = False,
    compile: bool = False,
    **fsdp_kwargs: Any,
) -> ShardedModel:
    """`adapted` sharded with FSDP2 (torch.distributed.fsdp.fully_shard) per block: call the
    returned model as the adapted one and step an optimizer over its `trainable_parameters()`.

    `blocks` are the module paths of the units (default: the repeated layers the sites sit in,
    `model.layers.0` ...). `activation_checkpointing` recomputes each block's forward in its
    backward (non-reentrant, while the block is gathered; the matmul outputs are kept, see
    lowering/checkpointing.py); `compile` compiles each block's
    piece with Inductor, fullgraph. `fsdp_kwargs` go to every `fully_shard` call
    (`mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)`,
    `reshard_after_forward`, ...); a `param_dtype` other than the model's has the graphs traced
    again in it. Every rank must start from the same adapter values (the same spec seed, or
    one checkpoint loaded), as with DDP; the tensors are sharded in place, so use the returned
    model from here on."""
    from torch.distributed.fsdp import fully_shard as torch_fully_shard

    _require_group()
    pipeline = pipeline_of(adapted)
    if not pipeline.trainable_parameters():
        raise ValueError("the model has no trainable adapter tensors to train in parallel")
    if any(isinstance(p, DTensor) for p in adapted.parameters()):
        raise ValueError("this model is sharded already: fully_shard it once")
    mesh = mesh if mesh is not None else _default_mesh(adapted)
    paths = blocks if blocks is not None else block_paths(pipeline.sites, pipeline.model)
    # both modes' graphs are built before the tensors are sharded
    compute = getattr(fsdp_kwargs.get("mp_policy"), "param_dtype", None)
    if compute is not None and compute != pipeline.plan.assignments[0].site.dtype:
        if pipeline.quantized_weights:
            raise ValueError(
                f"mixed precision (param_dtype {compute}) on a quantized base: its weights "
                "dequantize to the model's dtype, so cast the model to it before compiling "
                "(model.to(torch.bfloat16), then peftc.compile) and drop param_dtype"
            )
        programs = programs_in(pipeline, compute)
    else:
        programs = {training: pipeline.program(training) for training in (True, False)}
    made: dict[str, Block] | list[str] = paths
    quantized = _codes_as_parameters(pipeline) if pipeline.quantized_weights else None
    tops = {}
    for training, program in programs.items():
        tops[training], made = split_blocks(
            program, pipeline.model, pipeline.adapters, made, quantized
        )
    # a quantized base's weights are one-value shape holders: nothing to shard; and FSDP2
    # cannot shard a 0-d tensor (SingLoRA's step counter): each rank keeps those whole, and
    # every rank advances its counters alike
    params = dict(pipeline.model.named_parameters(remove_duplicate=False))
    holders = {params[name] for name in pipeline.quantized_weights}
    holders |= {p for p in pipeline.adapters.parameters() if p.dim() == 0}
    for block in made.values():
        block.runners["train"] = wrap_piece(
            block.pieces["train"], compile, activation_checkpointing
        )
        torch_fully_shard(block, mesh=mesh, ignored_params=holders, **fsdp_kwargs)
    in_blocks = holders | {p for block in made.values() for p in block.parameters()}
    sharded = ShardedModel(adapted, made, programs, tops)
    torch_fully_shard(sharded, mesh=mesh, ignored_params=in_blocks, **fsdp_kwargs)
    if quantized is not None:
        _records_read_the_shards(pipeline)
    return sharded.train(adapted.training)


def _codes_as_parameters(pipeline: Any) -> torch.nn.Module:
    """A quantized base's integer codes made frozen parameters, so that FSDP2 shards them
    with their block (it gathers them whole, and never casts integer tensors under mixed
    precision); the float scales and code tables stay replicated buffers, which keeps them in
    fp32 under a bf16 policy. The quantization records then point at the parameters, so the
    whole codes are not kept beside their shards."""
    store = pipeline.quantized
    for module in store.modules():
        for name, buffer in list(module._buffers.items()):
            if buffer is not None and not buffer.is_floating_point():
                del module._buffers[name]
                module.register_parameter(name, torch.nn.Parameter(buffer, requires_grad=False))
    return store


def _records_read_the_shards(pipeline: Any) -> None:
    """Point the quantization records at the tensors the store holds now (FSDP2's shards)."""
    state = pipeline.state()
    for weight, record in pipeline.quantized_weights.items():
        for name in record.tensors:
            record.tensors[name] = state[state_name(weight, name)]


def _default_mesh(adapted: torch.nn.Module) -> Any:
    from torch.distributed.device_mesh import init_device_mesh

    device = next(adapted.parameters()).device
    return init_device_mesh(device.type, (dist.get_world_size(),))
