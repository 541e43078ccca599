"""SingLoRA: y = base(x) + (alpha/r)·u(t)·x·(A[:out]·A[:in]ᵀ)ᵀ, one trainable A (max(in, out)×r).

Bensaïd et al., "SingLoRA: Low Rank Adaptation Using a Single Matrix" (arXiv 2507.05566).
A is Kaiming-uniform (a = √5); the update is A·Aᵀ, symmetric on a square layer, and on a
non-square one A[:out]·A[:in]ᵀ (the rule of the unofficial PEFT-SingLoRA package, as the
paper has no code). u(t) = min(t / ramp_up_steps, 1) ramps the update in; ramp_up_steps = 0
turns the ramp off (u = 1).

t is a frozen int64 tensor `singlora_t` (one per site) that counts TRAINING FORWARD PASSES, not
optimizer steps: under gradient accumulation of k micro-batches it runs k times faster than
the optimizer's step, so scale ramp_up_steps by k. It is a step counter (`ParamSpec.counter`):
the pipeline adds 1 to it as each training forward begins, outside the graph, and the graph
only reads it (the first training step sees u = 1/ramp_up_steps, so A gets a gradient at
once); eval forwards read it and never count. A graph that wrote t (this method's first form,
`t.add_(1)` in the forward) broke activation checkpointing: eagerly torch.utils.checkpoint
refused the written saved input, and compiled, the recompute read the incremented t, so the
backward used u one step ahead. In training, u comes from a small op of peftc's own
(`peftc::singlora_ramp`), which torch.compile's partitioner saves for the backward rather than
recomputing it from t, which the next forward may have advanced by then. t is saved with
the checkpoint (save_frozen), so a resumed run continues the ramp. With t = 0 (at init)
u = 0: the identity. Merged: W + s·u(t)·ΔW at the current t (merging mid-ramp bakes u in).
"""

from __future__ import annotations

import math
from typing import ClassVar

import sympy
import torch
import torch.nn.functional as F

from passes.adapters.base import Params, ParamSpec, SiteContext, Tensor
from passes.adapters.contract import NON_NEGATIVE_INT, LowRank, hp
from passes.adapters.cost import D_IN, D_OUT, Cost, R, T, dtype_bytes, site_symbols
from passes.adapters.registry import register
from rewrite.sites import Site


def ramp(t: Tensor, steps: int) -> Tensor:
    """u(t) = min(t / steps, 1) as an fp32 scalar tensor (1 when steps = 0: no ramp)."""
    if steps == 0:
        return torch.ones((), dtype=torch.float32, device=t.device)
    return (t.float() / steps).clamp(max=1.0)


@torch.library.custom_op("peftc::singlora_ramp", mutates_args=())
def ramp_op(t: Tensor, steps: int) -> Tensor:
    """`ramp` as an op of its own, which torch.compile's partitioner saves for the backward
    rather than recomputing it from t (which a next forward may have advanced)."""
    return ramp(t, steps)


@ramp_op.register_fake
def _(t: Tensor, steps: int) -> Tensor:
    return torch.empty((), dtype=torch.float32, device=t.device)


@register("singlora")
class SingLoRA(LowRank):
    ramp_up_steps: int = hp(
        100, NON_NEGATIVE_INT, "training forward passes until u = 1", hint="0 turns the ramp off"
    )

    supported_ops: ClassVar[tuple[str, ...]] = ("linear", "addmm")
    save_frozen: ClassVar[bool] = True  # the step counter t is training state

    def params(self, site: Site) -> dict[str, ParamSpec]:
        return {
            "singlora_A": ParamSpec((max(site.in_features, site.out_features), self.rank)),
            "singlora_t": ParamSpec((), trainable=False, dtype=torch.int64, counter=True),
        }

    def init(self, site: Site, W: Tensor, calib: object, generator: torch.Generator) -> Params:
        A = torch.empty(self.params(site)["singlora_A"].shape, dtype=torch.float32)
        torch.nn.init.kaiming_uniform_(A, a=math.sqrt(5), generator=generator)
        return {"singlora_A": A.to(W.dtype), "singlora_t": torch.zeros((), dtype=torch.int64)}

    def forward(
        self, x: Tensor, base_out: Tensor, W: Tensor, p: Params, ctx: SiteContext
    ) -> Tensor:
        A, t, site = p["singlora_A"], p["singlora_t"], ctx.site  # t counts this forward
        h = F.dropout(x, self.dropout, ctx.training) if self.dropout > 0 else x
        u = (ramp_op if ctx.training else ramp)(t, self.ramp_up_steps)
        scale = (u * self.scaling).to(x.dtype)
        update = F.linear(F.linear(h, A[: site.in_features].t()), A[: site.out_features])
        return base_out + update * scale

    def merged_weight(self, site: Site, W: Tensor, p: Params) -> Tensor:
        """W + s·u(t)·A[:out]·A[:in]ᵀ at the current t."""
        A = p["singlora_A"]
        u = float(ramp(p["singlora_t"], self.ramp_up_steps))
        return W + (A[: site.out_features] @ A[: site.in_features].t()) * (self.scaling * u)

    def cost(self, site: Site) -> Cost:
        # x·A[:in] (r·in), ·A[:out]ᵀ (r·out) per token, then scale-and-add
        flops_forward = 2 * T * R * (D_IN + D_OUT) + 2 * T * D_OUT
        saved = R + (D_IN if self.dropout > 0 else 0)
        return Cost(
            params=sympy.Max(D_IN, D_OUT) * R,
            flops_forward=flops_forward,
            flops_backward=2 * flops_forward,
            activation_bytes=T * saved * dtype_bytes(site.dtype),
            symbols=site_symbols(site, self.rank),
        )
