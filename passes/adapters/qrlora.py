"""QR-LoRA: W' = W_res + s·Q·(R₀ + triu(ΔR)), only the upper triangle of ΔR (r×in) trains.

Yang et al., "QR-LoRA: Efficient and Disentangled Fine-tuning via QR Decomposition for
Customized Generation" (ICCV 2025; luna-ai-lab/QR-LoRA). From the SVD W = U·S·Vᵀ: core = U_r·diag(S_r/s)·V_rᵀ, (Q, R) = qr(core) (reduced), Q = Q[:, :r]
(out×r) and R₀ = R[:r] (r×in) frozen, W_res = W − s·Q·R₀. ΔR starts at zero and is masked
to its upper triangle (ΔR ⊙ triu), so the model starts as the identity; s = alpha/rank
(alpha = rank by default, so s = 1). Merged: W' itself.

peftc keeps neither W_res (a second copy of W) nor R₀: W' = W + s·Q·triu(ΔR) is the same
weight, so the forward adds the rank-r path s·(x·triu(ΔR)ᵀ)·Qᵀ to the base output. SVD and
QR run in fp32 (W.float()) and Q is cast to the weight's dtype; Q is derived from W, so a
checkpoint holds ΔR only. Layers: linear (and addmm).
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F

from passes.adapters.base import Params, ParamSpec, SiteContext, Tensor
from passes.adapters.contract import (
    POSITIVE_INT,
    POSITIVE_NUMBER,
    Method,
    alpha_over_rank,
    hp,
    optional,
    rank_too_large,
)
from passes.adapters.cost import D_IN, D_OUT, Cost, R, T, dtype_bytes, site_symbols
from passes.adapters.registry import register
from rewrite.sites import Site


def qr_basis(W: Tensor, r: int, s: float) -> tuple[Tensor, Tensor]:
    """(Q [out, r], R₀ [r, in]) of the reduced QR of U_r·diag(S_r/s)·V_rᵀ, in fp32."""
    U, S, Vh = torch.linalg.svd(W.detach().float(), full_matrices=False)
    core = (U[:, :r] * (S[:r] / s)) @ Vh[:r]
    Q, R_ = torch.linalg.qr(core, mode="reduced")
    return Q[:, :r], R_[:r]


@register("qrlora")
class QRLoRA(Method):
    rank: int = hp(8, POSITIVE_INT)
    alpha: float | None = hp(None, optional(POSITIVE_NUMBER, "alpha = rank, so s = 1"))

    supported_ops: ClassVar[tuple[str, ...]] = ("linear", "addmm")

    @property
    def scaling(self) -> float:
        return alpha_over_rank(self.alpha, self.rank)

    def check_site(self, site: Site) -> str | None:
        return rank_too_large(self.rank, site.in_features, site.out_features)

    def params(self, site: Site) -> dict[str, ParamSpec]:
        return {
            "qrlora_delta_R": ParamSpec((self.rank, site.in_features)),
            "qrlora_Q": ParamSpec((site.out_features, self.rank), trainable=False),
        }

    def init(self, site: Site, W: Tensor, calib: object, generator: torch.Generator) -> Params:
        Q, _ = qr_basis(W, self.rank, self.scaling)
        return {
            "qrlora_delta_R": torch.zeros(self.rank, site.in_features, dtype=W.dtype),
            "qrlora_Q": Q.to(W.dtype).contiguous(),
        }

    def forward(
        self, x: Tensor, base_out: Tensor, W: Tensor, p: Params, ctx: SiteContext
    ) -> Tensor:
        latent = F.linear(x, torch.triu(p["qrlora_delta_R"]))  # ΔR ⊙ triu: its mask
        return base_out + F.linear(latent, p["qrlora_Q"]) * self.scaling

    def merged_weight(self, site: Site, W: Tensor, p: Params) -> Tensor:
        """W' = W_res + s·Q·(R₀ + triu(ΔR)) = W + s·Q·triu(ΔR), [out, in]."""
        return W + (p["qrlora_Q"] @ torch.triu(p["qrlora_delta_R"])) * self.scaling

    def cost(self, site: Site) -> Cost:
        # the mask (r·in), x·triu(ΔR)ᵀ (r·in), ·Qᵀ (r·out) per token, then scale-and-add
        flops_forward = R * D_IN + 2 * T * R * (D_IN + D_OUT) + 2 * T * D_OUT
        return Cost(
            params=R * D_IN,
            flops_forward=flops_forward,
            flops_backward=2 * flops_forward,
            activation_bytes=(T * (D_IN + R) + R * D_IN) * dtype_bytes(site.dtype),
            symbols=site_symbols(site, self.rank),
        )
