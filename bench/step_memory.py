"""What one training step allocates above the memory at rest, for the CPU benchmarks.

Read from torch.profiler's memory timeline (CPU allocator events), so every contender is
measured the same way in one process, and the figure does not depend on what else the machine
runs (unlike RSS or step time).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.profiler import ProfilerActivity, profile
from torch.profiler._memory_profiler import MemoryProfileTimeline


def adamw_step(model: torch.nn.Module, inputs: dict, owner: torch.nn.Module | None = None):
    """One AdamW step on the loss the model computes from `inputs`' labels, as a callable
    returning the loss; the trainable tensors are read from `owner` (default: the model)."""
    params = [p for p in (owner or model).parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)

    def step() -> float:
        loss = model(**inputs).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step


def peak_step_bytes(step: Callable[[], object]) -> int:
    """The peak of what `step()` allocates above the memory at rest, in bytes."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True,
                 with_stack=True) as prof:  # fmt: skip
        step()
    _, sizes = MemoryProfileTimeline(prof._memory_profile())._coalesce_timeline("cpu")
    return int(max(sum(s) for s in sizes))
