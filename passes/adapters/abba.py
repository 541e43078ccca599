"""ABBA: ΔW = s·(B1·A1) ⊙ (B2·A2), a Hadamard product of two low-rank products; s = alpha.

Singhal et al., "ABBA: Highly Expressive Hadamard Product Adaptation for Large Language
Models" (arXiv 2505.14238). All four factors train: A1 (r×in) and B1 (out×r) start from the
truncated SVD of W with √S on each side (A1 = √S·Vᵀ, B1 = U·√S), A2 (r×in) is Kaiming-uniform
(a = 0) and B2 (out×r) zero, so the adapter starts as the identity. r1 = r2 = rank.

The forward never forms the out×in ΔW: with the Khatri–Rao products B* = KR(B1, B2)
(out×r², row-wise) and A* = KR(A1, A2) (r²×in, column-wise), ΔW = B*·A*, so
y = base(x) + s·(x·A*ᵀ)·B*ᵀ. The scale s = √alpha·√alpha (the reference's √alpha on each of
B1 and B2) is alpha; alpha defaults to rank.

Choices: the SVD is `torch.svd_lowrank(W, q=rank, niter=10)` as in the reference, run in fp32
on the CPU with its random projection seeded from the compile generator (so init is
deterministic and touches no global RNG state). The reference declares a dropout it never
applies; peftc has none. All tensors train and are saved.
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
    hp,
    optional,
    rank_too_large,
)
from passes.adapters.cost import D_IN, D_OUT, Cost, R, T, dtype_bytes, site_symbols
from passes.adapters.registry import register
from rewrite.sites import Site


def svd_lowrank_factors(W: Tensor, r: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """(A1, B1) = (√S·Vᵀ, U·√S) from torch.svd_lowrank of the [out, in] weight, in fp32,
    with the random projection seeded from `generator`."""
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        U, S, V = torch.svd_lowrank(W.detach().float().cpu(), q=r, niter=10)
    root = S.sqrt()
    return (root[:, None] * V.T).contiguous(), (U * root).contiguous()


def khatri_rao(B1: Tensor, B2: Tensor, A1: Tensor, A2: Tensor) -> tuple[Tensor, Tensor]:
    """B* [out, r1·r2] (row-wise products) and A* [r1·r2, in] (column-wise), B*·A* = B1A1 ⊙ B2A2."""
    B = (B1.unsqueeze(2) * B2.unsqueeze(1)).flatten(1)
    A = (A1.unsqueeze(1) * A2.unsqueeze(0)).flatten(0, 1)
    return B, A


@register("abba")
class ABBA(Method):
    rank: int = hp(8, POSITIVE_INT, "r1 = r2, the rank of each product")
    alpha: float | None = hp(None, optional(POSITIVE_NUMBER, "alpha = rank"), "the scale s")

    supported_ops: ClassVar[tuple[str, ...]] = ("linear", "addmm")

    @property
    def scaling(self) -> float:
        return float(self.rank if self.alpha is None else self.alpha)

    def check_site(self, site: Site) -> str | None:
        return rank_too_large(self.rank, site.in_features, site.out_features)

    def params(self, site: Site) -> dict[str, ParamSpec]:
        r, i, o = self.rank, site.in_features, site.out_features
        return {
            "abba_A1": ParamSpec((r, i)),
            "abba_B1": ParamSpec((o, r)),
            "abba_A2": ParamSpec((r, i)),
            "abba_B2": ParamSpec((o, r)),
        }

    def init(self, site: Site, W: Tensor, calib: object, generator: torch.Generator) -> Params:
        A1, B1 = svd_lowrank_factors(W, self.rank, generator)
        A2 = torch.empty(self.rank, site.in_features)
        torch.nn.init.kaiming_uniform_(A2, a=0.0, generator=generator)
        B2 = torch.zeros(site.out_features, self.rank)
        return {
            "abba_A1": A1.to(W.device, W.dtype),
            "abba_B1": B1.to(W.device, W.dtype),
            "abba_A2": A2.to(W.device, W.dtype),
            "abba_B2": B2.to(W.device, W.dtype),
        }

    def forward(
        self, x: Tensor, base_out: Tensor, W: Tensor, p: Params, ctx: SiteContext
    ) -> Tensor:
        B, A = khatri_rao(p["abba_B1"], p["abba_B2"], p["abba_A1"], p["abba_A2"])
        return base_out + F.linear(F.linear(x, A), B) * self.scaling

    def merged_weight(self, site: Site, W: Tensor, p: Params) -> Tensor:
        """W + s·(B1·A1) ⊙ (B2·A2) in [out, in] layout."""
        one = p["abba_B1"] @ p["abba_A1"]
        two = p["abba_B2"] @ p["abba_A2"]
        return W + one * two * self.scaling

    def cost(self, site: Site) -> Cost:
        r2 = R**2
        # per step: the Khatri-Rao products A* (r²·in) and B* (r²·out); per token:
        # x·A*ᵀ (2·r²·in), ·B*ᵀ (2·r²·out), then scale-and-add
        flops_forward = r2 * (D_IN + D_OUT) + 2 * T * r2 * (D_IN + D_OUT) + 2 * T * D_OUT
        # saved: x·A*ᵀ per token, and A*, B* for the factors' gradients
        saved = T * r2 + r2 * (D_IN + D_OUT)
        return Cost(
            params=2 * R * (D_IN + D_OUT),
            flops_forward=flops_forward,
            flops_backward=2 * flops_forward + 2 * r2 * (D_IN + D_OUT),
            activation_bytes=saved * dtype_bytes(site.dtype),
            symbols=site_symbols(site, self.rank),
        )
