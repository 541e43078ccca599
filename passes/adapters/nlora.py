"""NLoRA / SLoRA: y = base(x) + s·B·N·A·dropout(x), A (r×in), N (r×r), B (out×r) all trainable.

Guo et al., "NLoRA: Nyström-Initiated Low-Rank Adaptation for Large Language Models"
(arXiv 2502.14482); official code TracyGuo2001/NLoRA, peft/src/peft/tuners/lora/layer.py
(`slora_init`, `nlora_init`, `get_delta_weight`). s = alpha/rank (alpha/√rank with rsLoRA).
Specs and checkpoints call the init choice `init`, as the reference does; in code the field is
`init_weights` (a field called `init` would hide the contract's `init` method).

- `init: slora` (the default): A and N Kaiming-uniform (a = √5), B zeros: the identity.
- `init: nystrom`: A = W[:r, :], B = W[:, :r], N = W[:r, :r]⁺ (torch.linalg.pinv in
  fp32), the paper's Nyström form B·N·A ≈ W. The paper takes the initial update out of W so
  the model starts as the base (the reference code copies W[:r, :r] itself into N and does not
  subtract; peftc follows the paper). As PiSSA in peftc (residual_lora.py), the user's weight is not
  touched: copies A₀, N₀, B₀ of the initial factors stay frozen and
      y = W·x + s·(B·N·A − B₀·N₀·A₀)·x,   merged: W + s·(B·N·A − B₀·N₀·A₀),
  the last product taken as one matmul over [B, −B₀] so the two cancel inside it. A₀, N₀, B₀
  are rebuilt from W when a checkpoint loads, so only A, N and B are saved.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F

from passes.adapters.base import Params, ParamSpec, SiteContext, Tensor
from passes.adapters.contract import LowRank, hp, one_of
from passes.adapters.cost import D_IN, D_OUT, Cost, R, T, dtype_bytes, site_symbols
from passes.adapters.registry import register
from rewrite.sites import Site

TRAINED = ("nlora_A", "nlora_N", "nlora_B")
FROZEN = ("nlora_A0", "nlora_N0", "nlora_B0")


def nystrom_factors(W: Tensor, r: int) -> tuple[Tensor, Tensor, Tensor]:
    """(A, N, B) = (W[:r, :], W[:r, :r]⁺, W[:, :r]) of the [out, in] weight, in fp32."""
    Wf = W.detach().float()
    return Wf[:r].clone(), torch.linalg.pinv(Wf[:r, :r]), Wf[:, :r].clone()


@register("nlora")
class NLoRA(LowRank):
    # the reference's `init` in specs and checkpoints; the field cannot be called init (it
    # would hide Method.init)
    init_weights: str = hp(
        "slora", one_of("slora", "nystrom"), "the initialisation", spec_name="init"
    )

    supported_ops: ClassVar[tuple[str, ...]] = ("linear", "addmm")

    def params(self, site: Site) -> dict[str, ParamSpec]:
        r, d_in, d_out = self.rank, site.in_features, site.out_features
        shapes = dict(zip(TRAINED, ((r, d_in), (r, r), (d_out, r)), strict=True))
        out = {n: ParamSpec(s) for n, s in shapes.items()}
        if self.init_weights == "nystrom":
            out.update({f"{n}0": ParamSpec(s, trainable=False) for n, s in shapes.items()})
        return out

    def init_tensors(self, W: Tensor, generator: torch.Generator) -> tuple[Tensor, ...]:
        r, (d_out, d_in) = self.rank, W.shape
        if self.init_weights == "nystrom":
            return nystrom_factors(W, r)
        A, N = torch.empty(r, d_in), torch.empty(r, r)
        torch.nn.init.kaiming_uniform_(A, a=math.sqrt(5), generator=generator)
        torch.nn.init.kaiming_uniform_(N, a=math.sqrt(5), generator=generator)
        return A, N, torch.zeros(d_out, r)

    def init(self, site: Site, W: Tensor, calib: object, generator: torch.Generator) -> Params:
        values = [t.to(W.dtype).contiguous() for t in self.init_tensors(W, generator)]
        p = dict(zip(TRAINED, values, strict=True))
        if self.init_weights == "nystrom":
            p.update({f: t.clone() for f, t in zip(FROZEN, values, strict=True)})
        return p

    def forward(
        self, x: Tensor, base_out: Tensor, W: Tensor, p: Params, ctx: SiteContext
    ) -> Tensor:
        A, N, B, s = p["nlora_A"], p["nlora_N"], p["nlora_B"], self.scaling
        h = F.dropout(x, self.dropout, ctx.training) if self.dropout > 0 else x
        latent = F.linear(F.linear(h, A), N)
        if self.init_weights == "slora":
            return base_out + F.linear(latent, B) * s
        latent0 = F.linear(F.linear(x, p["nlora_A0"]), p["nlora_N0"])
        stacked = torch.cat([latent, latent0], dim=-1)
        return base_out + F.linear(stacked, torch.cat([B, -p["nlora_B0"]], dim=1)) * s

    def merged_weight(self, site: Site, W: Tensor, p: Params) -> Tensor:
        """W + s·B·N·A (− s·B₀·N₀·A₀ for the Nyström init), in [out, in] layout."""
        delta = p["nlora_B"] @ p["nlora_N"] @ p["nlora_A"]
        if self.init_weights == "nystrom":
            delta = delta - p["nlora_B0"] @ p["nlora_N0"] @ p["nlora_A0"]
        return W + delta * self.scaling

    def cost(self, site: Site) -> Cost:
        # x·Aᵀ (r·in), ·Nᵀ (r²), ·Bᵀ (r·out) per token; the Nyström init runs the frozen
        # copy too (its last matmul stacked with B's: 2r wide)
        paths = 2 if self.init_weights == "nystrom" else 1
        flops_forward = 2 * T * paths * R * (D_IN + R + D_OUT) + 2 * T * D_OUT
        saved = paths * 2 * R + (D_IN if self.dropout > 0 else 0)
        return Cost(
            params=R * (D_IN + D_OUT) + R**2,
            flops_forward=flops_forward,
            flops_backward=2 * flops_forward,
            activation_bytes=T * saved * dtype_bytes(site.dtype),
            symbols=site_symbols(site, self.rank),
        )
