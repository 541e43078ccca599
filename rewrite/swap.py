"""Parameters swapped into a model for the duration of a block, then put back.

A trace sometimes has to see other values as the model's own parameters: stand-ins in a
compute dtype (FSDP2 mixed precision, lowering/compute_dtype.py), or a quantized base's
weights dequantized (passes/quantize.py). The values go into the modules' own parameter
tables, not through `torch.func.functional_call`, because torch.export must see them as
parameters (sites are ops on parameters). Tied parameters get the same replacement.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch


@contextlib.contextmanager
def swapped_parameters(
    model: torch.nn.Module, replace: Callable[[torch.nn.Parameter], torch.Tensor | None]
) -> Iterator[None]:
    """Within the block, each parameter `replace` gives a tensor for is that tensor (frozen);
    the originals come back after, even on error."""
    made: dict[int, torch.nn.Parameter | None] = {}
    saved = []
    try:
        for module in model.modules():
            for leaf, param in list(module._parameters.items()):
                if param is None:
                    continue
                if id(param) not in made:
                    value = replace(param)
                    made[id(param)] = (
                        None if value is None else torch.nn.Parameter(value, requires_grad=False)
                    )
                if made[id(param)] is not None:
                    saved.append((module, leaf, param))
                    module._parameters[leaf] = made[id(param)]
        yield
    finally:
        for module, leaf, param in saved:
            module._parameters[leaf] = param
