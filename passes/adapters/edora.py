"""EDoRA: DoRA with LoRA-XS's factors, y = (m / ‖W + s·B·R·A‖_row) ⊙ (W + s·B·R·A) x + bias.

Nasiri & Garraghan, "EDoRA: Efficient Weight-Decomposed Low-Rank Adaptation via Singular Value
Decomposition" (arXiv 2501.12067). A = S_r·V_rᵀ (r×in) and B = U_r (out×r) are frozen, from the
truncated SVD of W (`loraxs.svd_factors`, exact, in fp32); R (r×r) trains from N(0, init_sigma)
and the magnitude m (out) trains from ‖W‖ per output row, so the model moves slightly at init.
As in DoRA (and the official `forward_edora`) the norm is detached and the base output reused:
y = base + (m/n − 1)·(base − bias) + (m/n)·s·B·R·A·x, s = alpha/rank (alpha/√rank with rsLoRA).
Merged: m ⊙ (W + s·B·R·A) / ‖W + s·B·R·A‖_row.

A and B are rebuilt from W when a checkpoint loads; R and m are saved. With lora_A = R·A,
lora_B = B and the same magnitude, EDoRA is peftc's `dora` (tests/test_method_edora.py).
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F

from passes.adapters.base import Params, ParamSpec, SiteContext, Tensor
from passes.adapters.contract import POSITIVE_NUMBER, LowRank, hp
from passes.adapters.cost import D_IN, D_OUT, Cost, R, T, dtype_bytes, site_symbols
from passes.adapters.loraxs import svd_factors
from passes.adapters.registry import register
from rewrite.sites import Site


@register("edora")
class EDoRA(LowRank):
    alpha: float = hp(16.0, POSITIVE_NUMBER)
    init_sigma: float = hp(1e-5, POSITIVE_NUMBER, "the std of R's normal init")

    supported_ops: ClassVar[tuple[str, ...]] = ("linear", "addmm")
    starts_as_identity: ClassVar[bool] = False  # R ~ N(0, init_sigma)

    def params(self, site: Site) -> dict[str, ParamSpec]:
        r = self.rank
        return {
            "edora_R": ParamSpec((r, r)),
            "edora_magnitude": ParamSpec((site.out_features,)),
            "edora_A": ParamSpec((r, site.in_features), trainable=False),
            "edora_B": ParamSpec((site.out_features, r), trainable=False),
        }

    def init(self, site: Site, W: Tensor, calib: object, generator: torch.Generator) -> Params:
        A, B = svd_factors(W, self.rank)
        R_ = torch.empty(self.rank, self.rank).normal_(0.0, self.init_sigma, generator=generator)
        m = torch.linalg.norm(W.detach().float(), dim=1)  # ‖W‖ per output row
        return {
            "edora_R": R_.to(W.dtype),
            "edora_magnitude": m.to(W.dtype),
            "edora_A": A.to(W.dtype).contiguous(),
            "edora_B": B.to(W.dtype).contiguous(),
        }

    def _delta(self, p: Params) -> Tensor:
        """s·B·R·A, [out, in]."""
        return (p["edora_B"] @ p["edora_R"] @ p["edora_A"]) * self.scaling

    def forward(
        self, x: Tensor, base_out: Tensor, W: Tensor, p: Params, ctx: SiteContext
    ) -> Tensor:
        detached = {k: v.detach() for k, v in p.items()}
        # Detached, as in DoRA (§4.3), PEFT and the official code: the norm gets no gradient.
        norm = torch.linalg.norm(W + self._delta(detached), dim=1).detach()
        scale = p["edora_magnitude"] / norm
        dropped = self.dropout > 0 and ctx.training
        h = F.dropout(x, self.dropout, True) if dropped else x
        latent = F.linear(F.linear(h, p["edora_A"]), p["edora_R"])
        lora_out = F.linear(latent, p["edora_B"])
        if dropped:  # the official code recomputes the base part on the dropped-out input
            base = F.linear(h, W)
        elif ctx.bias is not None:
            base = base_out - ctx.bias
        else:
            base = base_out
        return base_out + (scale - 1) * base + scale * lora_out * self.scaling

    def merged_weight(self, site: Site, W: Tensor, p: Params) -> Tensor:
        """m ⊙ (W + s·B·R·A) / ‖W + s·B·R·A‖_row, in [out, in] layout."""
        V = W + self._delta(p)
        return V * (p["edora_magnitude"] / torch.linalg.norm(V, dim=1))[:, None]

    def cost(self, site: Site) -> Cost:
        # per token: x·Aᵀ, ·Rᵀ, ·Bᵀ, then the two rescalings and the adds
        lora_flops = 2 * T * R * (D_IN + R + D_OUT)
        # once per step: B·R·A, W + s·ΔW and its row norms
        norm_flops = 2 * R**2 * D_OUT + 2 * R * D_IN * D_OUT + 3 * D_IN * D_OUT
        flops_forward = lora_flops + norm_flops + 5 * T * D_OUT
        saved = 2 * R + D_OUT + (D_IN if self.dropout > 0 else 0)
        return Cost(
            params=R**2 + D_OUT,
            flops_forward=flops_forward,
            flops_backward=2 * lora_flops + 2 * T * D_OUT,
            activation_bytes=T * saved * dtype_bytes(site.dtype),
            symbols=site_symbols(site, self.rank),
        )
