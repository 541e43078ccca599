"""Autocast's casts of frozen weights, made once per weight change instead of every step.

Under `torch.autocast`, a matmul casts its fp32 weight to the autocast dtype on every call,
and autocast caches nothing for a weight that needs no gradient. A frozen base is all such
weights, so each training step re-reads every base weight in fp32 and writes a bf16 copy of
it (and the compiled backward, which may recompute the cast rather than save it, can do so
again). The weights do not change between steps, so the cast is loop-invariant: this keeps
the cast copy of each frozen weight and hands it to the compiled graph in the fp32 weight's
place, casting again only when the weight changes (its version counter, or another tensor in
its slot) or the autocast dtype does.

Only weights whose every use in the graph, through views, is an input of a matmul that
autocast runs in its lower precision (linear, mm, addmm, bmm, baddbmm, matmul, convolution,
peftc's fused linear + cross-entropy) are replaced: there autocast would cast the weight to the
same dtype anyway, so the graph computes exactly what it computes on the fp32 weight. A weight
read by anything else (an RMSNorm's scale, an embedding table, DoRA's weight norm) keeps fp32,
and so does any weight that requires grad. The copies live between steps: half the fp32 size
of the replaced weights in bf16, memory the step held anyway while its forward's casts were
saved for the backward.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx

import passes.fused_loss  # noqa: F401  (registers peftc::linear_cross_entropy)
from rewrite.program import PARAMETER, Program

aten = torch.ops.aten

# ops autocast runs in its lower-precision dtype on CPU and CUDA alike, casting every
# floating input (torch/csrc/autograd/autocast_mode.cpp, lower_precision_fp)
_LOW_PRECISION = {
    aten.linear.default,
    aten.mm.default,
    aten.addmm.default,
    aten.bmm.default,
    aten.baddbmm.default,
    aten.matmul.default,
    aten.conv1d.default,
    aten.conv2d.default,
    aten.conv3d.default,
    aten.convolution.default,
    torch.ops.peftc.linear_cross_entropy.default,  # its autocast kernel casts h and W
}
_VIEWS = {
    aten.t.default,
    aten.transpose.int,
    aten.permute.default,
    aten.view.default,
    aten.reshape.default,
    aten.unsqueeze.default,
    aten.expand.default,
    aten.alias.default,
    aten.detach.default,
}


def castable_slots(program: Program) -> list[int]:
    """Positions of the parameter slots whose every use is autocast's to cast (see above)."""

    def only_matmuls(node: torch.fx.Node) -> bool:
        users = list(node.users)
        return bool(users) and all(
            u.target in _LOW_PRECISION or (u.target in _VIEWS and only_matmuls(u)) for u in users
        )

    placeholders = [n for n in program.graph.nodes if n.op == "placeholder"]
    return [
        i
        for i, (slot, node) in enumerate(zip(program.slots, placeholders, strict=True))
        if slot.kind == PARAMETER and only_matmuls(node)
    ]


@dataclass
class _Cast:
    source: weakref.ref
    version: int
    pointer: int  # `weight.data = ...` keeps the version and changes the storage
    cast: torch.Tensor


class FrozenCasts:
    """Swaps the castable frozen fp32 weights in a call's arguments for cached autocast
    copies. `apply` returns the arguments and the autocast dtype it cast to (None: none)."""

    def __init__(self, positions: Sequence[int]) -> None:
        self.positions = list(positions)
        self._cache: dict[int, _Cast] = {}

    def apply(self, args: tuple[Any, ...]) -> tuple[tuple[Any, ...], torch.dtype | None]:
        if not self.positions or not torch.is_grad_enabled():
            return args, None
        tensors = [args[i] for i in self.positions if isinstance(args[i], torch.Tensor)]
        device = tensors[0].device.type if tensors else None
        if device is None or not torch.is_autocast_enabled(device):
            return args, None
        dtype = torch.get_autocast_dtype(device)
        out = list(args)
        for i in self.positions:
            weight = args[i]
            # a subclass (DTensor, a quantized weight) keeps its own casting
            plain = type(weight) in (torch.Tensor, torch.nn.Parameter)
            if not plain or weight.dtype != torch.float32 or weight.requires_grad:
                continue
            out[i] = self._cast(i, weight, dtype)
        return tuple(out), dtype

    def _cast(self, i: int, weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        kept = self._cache.get(i)
        if (
            kept is not None
            and kept.source() is weight
            and kept.version == weight._version
            and kept.pointer == weight.data_ptr()
            and kept.cast.dtype == dtype
        ):
            return kept.cast
        with torch.no_grad():
            cast = weight.detach().to(dtype)
        self._cache[i] = _Cast(weakref.ref(weight), weight._version, weight.data_ptr(), cast)
        return cast
