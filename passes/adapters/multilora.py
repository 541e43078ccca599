"""MultiLoRA: y = base(x) + c·Σᵢ sᵢ·Bᵢ·Aᵢ·x, n parallel LoRAs with learnable scalars sᵢ.

Wang et al., "MultiLoRA: Democratizing LoRA for Better Multi-Task Learning" (arXiv
2311.11501). n = num_adapters LoRA modules of rank r each run in parallel on the same input;
each has a learnable scalar sᵢ, zero at init, so the adapter starts as the identity;
c = alpha/rank (alpha = rank by default, c = 1). Merged: W + c·Σᵢ sᵢ·BᵢAᵢ.

There is no official code: the init follows the paper's text, which changes LoRA's init to
balance the subspaces, with nothing to check it against. peftc draws Aᵢ (r×in) and Bᵢ (out×r)
both Kaiming-uniform as torch.nn.init.kaiming_uniform_(a=√5) (each Bᵢ with fan-in r, as
nn.Linear(r, out) would be), and sᵢ = 0; the choice of a = √5 (PEFT's LoRA A) is ours.

The n modules run as one LoRA of rank n·r: x·[A₁; …; Aₙ]ᵀ, then [s₁B₁ … sₙBₙ]: two matmuls,
whatever n is. Tensors: multilora_A [n, r, in], multilora_B [out, n, r], multilora_scale [n].
"""

from __future__ import annotations

import math
from typing import ClassVar

import sympy
import torch
import torch.nn.functional as F

from passes.adapters.base import Params, ParamSpec, SiteContext, Tensor
from passes.adapters.contract import (
    POSITIVE_INT,
    POSITIVE_NUMBER,
    LowRank,
    Method,
    alpha_over_rank,
    hp,
    optional,
)
from passes.adapters.cost import D_IN, D_OUT, Cost, R, T, dtype_bytes, site_symbols
from passes.adapters.registry import register
from rewrite.sites import Site

N_ADAPTERS = sympy.Symbol("n", positive=True, integer=True)


@register("multilora")
class MultiLoRA(Method):
    rank: int = hp(8, POSITIVE_INT, "the rank of each LoRA module")
    num_adapters: int = hp(3, POSITIVE_INT, "the number of parallel LoRA modules")
    alpha: float | None = hp(None, optional(POSITIVE_NUMBER, "alpha = rank, so c = 1"))

    supported_ops: ClassVar[tuple[str, ...]] = ("linear", "addmm")

    @property
    def scaling(self) -> float:
        return alpha_over_rank(self.alpha, self.rank)

    def check_site(self, site: Site) -> str | None:
        return LowRank.check_site(self, site)  # each module's rank fits the layer

    def params(self, site: Site) -> dict[str, ParamSpec]:
        n, r = self.num_adapters, self.rank
        return {
            "multilora_A": ParamSpec((n, r, site.in_features)),
            "multilora_B": ParamSpec((site.out_features, n, r)),
            "multilora_scale": ParamSpec((n,)),
        }

    def init(self, site: Site, W: Tensor, calib: object, generator: torch.Generator) -> Params:
        n, r = self.num_adapters, self.rank
        A = torch.empty(n, r, site.in_features)
        B = torch.empty(n, site.out_features, r)
        for i in range(n):
            torch.nn.init.kaiming_uniform_(A[i], a=math.sqrt(5), generator=generator)
            torch.nn.init.kaiming_uniform_(B[i], a=math.sqrt(5), generator=generator)
        return {
            "multilora_A": A.to(W.dtype),
            "multilora_B": B.permute(1, 0, 2).contiguous().to(W.dtype),
            "multilora_scale": torch.zeros(n, dtype=W.dtype),
        }

    def _stacked(self, p: Params) -> tuple[Tensor, Tensor]:
        """[A₁; …; Aₙ] (n·r×in) and c·[s₁B₁ … sₙBₙ] (out×n·r)."""
        A, B, s = p["multilora_A"], p["multilora_B"], p["multilora_scale"]
        Bs = (B * s[:, None]).flatten(1) * self.scaling
        return A.flatten(0, 1), Bs

    def forward(
        self, x: Tensor, base_out: Tensor, W: Tensor, p: Params, ctx: SiteContext
    ) -> Tensor:
        A, Bs = self._stacked(p)
        return base_out + F.linear(F.linear(x, A), Bs)

    def merged_weight(self, site: Site, W: Tensor, p: Params) -> Tensor:
        """W + c·Σᵢ sᵢ·BᵢAᵢ in [out, in] layout."""
        A, Bs = self._stacked(p)
        return W + Bs @ A

    def cost(self, site: Site) -> Cost:
        n = N_ADAPTERS
        # c·sᵢ·Bᵢ (out·n·r), x·Aᵀ (n·r·in) and ·Bsᵀ (n·r·out) per token, then the add
        flops_forward = 2 * D_OUT * n * R + 2 * T * n * R * (D_IN + D_OUT) + T * D_OUT
        return Cost(
            params=n * R * (D_IN + D_OUT) + n,
            flops_forward=flops_forward,
            flops_backward=2 * flops_forward,
            activation_bytes=T * n * R * dtype_bytes(site.dtype),  # x·Aᵀ for B's gradient
            symbols={**site_symbols(site, self.rank), n: self.num_adapters},
        )
