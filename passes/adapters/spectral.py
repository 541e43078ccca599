"""Spectral Adapter (additive): W' = (U_r + B)·diag(S_r)·(V_r + A)ᵀ + W_res.

Zhang & Pilanci, "Spectral Adapter: Fine-Tuning in Spectral Space" (NeurIPS 2024). From the
SVD of W (fp32), U_r (out×r), S_r and V_r (in×r) are the top r singular triplets, frozen, and
W_res = W − U_r·diag(S_r)·V_rᵀ the rest; B (out×r) and A (in×r) train from zeros. So the model
starts as the base, yet both get gradients at init (through S_r and the singular vectors).

The official code replaces the base weight by W_res and adds x·(V_r + A)·diag(S_r)·(U_r + B)ᵀ.
peftc keeps W (the graph's own weight) and adds only the difference, expanded so that nothing
cancels: W' − W = (U_r + B)·diag(S_r)·Aᵀ + B·diag(S_r)·V_rᵀ, exactly zero at init. peftc takes
the exact SVD (torch.linalg.svd); U_r, S_r, V_r are rebuilt from W when a checkpoint loads, so
only A and B are saved. Merged: W + that difference (= W').
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F

from passes.adapters.base import Params, ParamSpec, SiteContext, Tensor
from passes.adapters.contract import POSITIVE_INT, Method, hp
from passes.adapters.cost import D_IN, D_OUT, Cost, R, T, dtype_bytes, site_symbols
from passes.adapters.registry import register
from passes.adapters.svd import svd
from rewrite.sites import Site


@register("spectral")
class Spectral(Method):
    rank: int = hp(8, POSITIVE_INT, "the number of top singular vectors tuned")

    supported_ops: ClassVar[tuple[str, ...]] = ("linear", "addmm")

    def check_site(self, site: Site) -> str | None:
        n = min(site.in_features, site.out_features)
        if self.rank > n:
            return (
                f"rank {self.rank} is larger than the layer's number of singular vectors "
                f"(min(in={site.in_features}, out={site.out_features}) = {n}); lower the rank"
            )
        return None

    def params(self, site: Site) -> dict[str, ParamSpec]:
        r, i, o = self.rank, site.in_features, site.out_features
        return {
            "spectral_A": ParamSpec((i, r)),
            "spectral_B": ParamSpec((o, r)),
            "spectral_U": ParamSpec((o, r), trainable=False),
            "spectral_S": ParamSpec((r,), trainable=False),
            "spectral_V": ParamSpec((i, r), trainable=False),
        }

    def init(self, site: Site, W: Tensor, calib: object, generator: torch.Generator) -> Params:
        r = self.rank
        U, S, Vh = svd(W)
        return {
            "spectral_A": torch.zeros(site.in_features, r, dtype=W.dtype),
            "spectral_B": torch.zeros(site.out_features, r, dtype=W.dtype),
            "spectral_U": U[:, :r].to(W.dtype).contiguous(),
            "spectral_S": S[:r].to(W.dtype).contiguous(),
            "spectral_V": Vh[:r].t().to(W.dtype).contiguous(),
        }

    def forward(
        self, x: Tensor, base_out: Tensor, W: Tensor, p: Params, ctx: SiteContext
    ) -> Tensor:
        A, B, U, S, V = (p[f"spectral_{k}"] for k in "ABUSV")
        through_a = F.linear(x, A.t()) * S  # x·A·diag(S_r)
        through_v = F.linear(x, V.t()) * S  # x·V_r·diag(S_r)
        return base_out + F.linear(through_a, U + B) + F.linear(through_v, B)

    def merged_weight(self, site: Site, W: Tensor, p: Params) -> Tensor:
        """W + (U_r + B)·diag(S_r)·Aᵀ + B·diag(S_r)·V_rᵀ = W_res + (U_r + B)·S_r·(V_r + A)ᵀ."""
        A, B, U, S, V = (p[f"spectral_{k}"] for k in "ABUSV")
        return W + ((U + B) * S) @ A.t() + (B * S) @ V.t()

    def cost(self, site: Site) -> Cost:
        # per token: x·A and x·V (r·in each), the S scalings, two up-projections (r·out
        # each) and the adds; once per step: U + B
        flops_forward = 4 * T * R * (D_IN + D_OUT) + 2 * T * R + 2 * T * D_OUT + R * D_OUT
        return Cost(
            params=R * (D_IN + D_OUT),
            flops_forward=flops_forward,
            flops_backward=2 * flops_forward,
            activation_bytes=T * 2 * R * dtype_bytes(site.dtype),  # x·A·S and x·V·S per token
            symbols=site_symbols(site, self.rank),
        )
