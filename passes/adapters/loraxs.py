"""LoRA-XS: y = base(x) + s·B·R·A·dropout(x), A and B frozen from the truncated SVD of W.

Bałazy et al., "LoRA-XS: Low-Rank Adaptation with Extremely Small Number of Parameters"
(arXiv 2405.17604). With W = U·S·Vᵀ: A = S_r·V_rᵀ (r×in, the singular values on the A side)
and B = U_r (out×r) are frozen; only R (r×r) trains, drawn from N(0, init_sigma), so the model
moves (slightly) at init. Merged: W + s·B·R·A; s = alpha/rank, alpha = rank by default.

peftc takes the exact SVD (torch.linalg.svd in fp32) where the official code runs sklearn's
randomized TruncatedSVD on Wᵀ: the same top-r subspace, no sklearn, with one sign per
singular pair fixed by rule (svd.py). A and B are rebuilt from W when a checkpoint loads, so
only R is saved. With the same B·R·A, LoRA-XS is a LoRA with
lora_A = R·A and lora_B = B (tests/test_method_loraxs.py compares the two).
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F

from passes.adapters.base import Params, ParamSpec, SiteContext, Tensor
from passes.adapters.contract import POSITIVE_NUMBER, LowRank, hp, optional
from passes.adapters.cost import D_IN, D_OUT, Cost, R, T, dtype_bytes, site_symbols
from passes.adapters.registry import register
from passes.adapters.svd import svd
from rewrite.sites import Site


def svd_factors(W: Tensor, r: int) -> tuple[Tensor, Tensor]:
    """(A, B) = (S_r·V_rᵀ, U_r) of the [out, in] weight, in fp32."""
    U, S, Vh = svd(W)
    return S[:r, None] * Vh[:r], U[:, :r]


@register("loraxs")
class LoRAXS(LowRank):
    alpha: float | None = hp(None, optional(POSITIVE_NUMBER, "alpha = rank, so s = 1"))
    init_sigma: float = hp(1e-5, POSITIVE_NUMBER, "the std of R's normal init")

    supported_ops: ClassVar[tuple[str, ...]] = ("linear", "addmm")
    starts_as_identity: ClassVar[bool] = False  # R ~ N(0, init_sigma)

    @property
    def scaling(self) -> float:
        alpha = self.rank if self.alpha is None else self.alpha
        return alpha / (self.rank**0.5 if self.use_rslora else self.rank)

    def params(self, site: Site) -> dict[str, ParamSpec]:
        r = self.rank
        return {
            "loraxs_R": ParamSpec((r, r)),
            "loraxs_A": ParamSpec((r, site.in_features), trainable=False),
            "loraxs_B": ParamSpec((site.out_features, r), trainable=False),
        }

    def init(self, site: Site, W: Tensor, calib: object, generator: torch.Generator) -> Params:
        A, B = svd_factors(W, self.rank)
        R_ = torch.empty(self.rank, self.rank).normal_(0.0, self.init_sigma, generator=generator)
        return {
            "loraxs_R": R_.to(W.dtype),
            "loraxs_A": A.to(W.dtype).contiguous(),
            "loraxs_B": B.to(W.dtype).contiguous(),
        }

    def forward(
        self, x: Tensor, base_out: Tensor, W: Tensor, p: Params, ctx: SiteContext
    ) -> Tensor:
        h = F.dropout(x, self.dropout, ctx.training) if self.dropout > 0 else x
        latent = F.linear(F.linear(h, p["loraxs_A"]), p["loraxs_R"])
        return base_out + F.linear(latent, p["loraxs_B"]) * self.scaling

    def merged_weight(self, site: Site, W: Tensor, p: Params) -> Tensor:
        """W + s·B·R·A in [out, in] layout."""
        return W + (p["loraxs_B"] @ p["loraxs_R"] @ p["loraxs_A"]) * self.scaling

    def cost(self, site: Site) -> Cost:
        # x·Aᵀ (r·in), ·Rᵀ (r²), ·Bᵀ (r·out) per token, then scale-and-add
        flops_forward = 2 * T * R * (D_IN + R + D_OUT) + 2 * T * D_OUT
        saved = 2 * R + (D_IN if self.dropout > 0 else 0)  # x·Aᵀ and x·Aᵀ·Rᵀ per token
        return Cost(
            params=R**2,
            flops_forward=flops_forward,
            flops_backward=2 * flops_forward,
            activation_bytes=T * saved * dtype_bytes(site.dtype),
            symbols=site_symbols(site, self.rank),
        )
