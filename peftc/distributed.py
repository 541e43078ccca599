"""Data-parallel training of an adapted model on torch.distributed.

`replicate(adapted)` wraps the model in PyTorch's DistributedDataParallel: every rank holds
the whole frozen base and the adapters; only the adapters have gradients, so only they are
all-reduced (averaged) after each backward. The process group comes from `mesh` (a 1-D
DeviceMesh) or is the default one; gloo runs it on CPUs, NCCL on GPUs.

`save_adapter(model, directory)` is collective: every rank calls it, rank 0 writes the one
file set (PEFT's format, through the same staged write as a single process) and the others
wait for it.

FSDP2 (`fully_shard`, sharding the base per block) is not here yet.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel


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
    """The AdaptedModel inside a DDP wrapper (or the model itself)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def replicate(adapted: torch.nn.Module, mesh: Any = None, **ddp_kwargs: Any) -> torch.nn.Module:
    """`adapted` wrapped for data-parallel training: call it and step an optimizer over
    `adapted.trainable_parameters()` as on one process. Ranks start from rank 0's adapter
    values (DDP broadcasts them)."""
    _require_group()
    if not adapted.trainable_parameters():
        raise ValueError("the model has no trainable adapter tensors to train in parallel")
    return DistributedDataParallel(adapted, process_group=_group(mesh), **ddp_kwargs)


def save_adapter(model: torch.nn.Module, directory: str) -> None:
    """Every rank calls this; rank 0 writes the adapter, then all ranks go on together."""
    _require_group()
    if dist.get_rank() == 0:
        adapted_of(model).save_adapter(directory)
    dist.barrier()
