"""LoRMA: a multiplicative update of W, W' = (I + s·B·A)·W (pre) or W·(I + s·B·A) (post).

Bihany et al., "LoRMA: Low-Rank Multiplicative Adaptation for LLMs" (Findings of ACL 2025,
arXiv 2506.07621; Exploration-Lab, IIT
Kanpur). s = alpha/rank. Two rank inflations make the low-rank product full-rank:
- rri (LoRMA+): W' = W + s·B·(A·W) (pre; B out×r zeros, A r×out Kaiming a = √5) or
  W' = W + s·(W·B)·A (post; B in×r, A r×in);
- shift (LoRMAπ): W' = s·shift(B·A)·W (pre) with shift(M)[i, j] = M[i, (j − i) mod n];
  B Kaiming with column 0 set to 1, A zero but A[0, 0] = 1, both divided by √s, so that
  s·shift(B·A) = I and W' = W at init.
The merged weight is W'. All tensors train.

Choices: post + shift is not in methods-reference.md, but the official code
(NLG/MetaMathQA/train_math_lorma.py, `MultLoRALinear`) defines it as W' = s·W·shift(B·A) with
the same init on in×in factors; peftc follows it. The official `rank_inflation: none` (B·A
without inflation, a pinv init) is not implemented. The shift is a cyclic skew done with a
concat and a reshape (no index tensor). The reference recomputes W' every step; peftc
avoids the out×out·in product in the pre forms by applying the update to the base output:
x·W'ᵀ = base − b + s·((base − b)·Aᵀ)·Bᵀ (rri) and (base − b)·(s·shift(B·A) − I)ᵀ (shift),
and uses W·B (out×r) in post + rri; post + shift still does the in×in matmul with W
(W·(s·shift(B·A) − I)) each step, as the reference does.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F

from passes.adapters.base import Params, ParamSpec, SiteContext, Tensor
from passes.adapters.contract import POSITIVE_INT, POSITIVE_NUMBER, Method, hp, one_of
from passes.adapters.cost import D_IN, D_OUT, Cost, R, T, dtype_bytes, site_symbols
from passes.adapters.registry import register
from rewrite.sites import Site


def shift(M: Tensor) -> Tensor:
    """shift(M)[i, j] = M[i, (j − i) mod n] for a square M: row i rotated right by i."""
    n = M.shape[0]
    doubled = torch.cat([M, M], dim=1).flatten()
    return doubled[n : n + n * (2 * n - 1)].view(n, 2 * n - 1)[:, :n]


@register("lorma")
class LoRMA(Method):
    rank: int = hp(8, POSITIVE_INT)
    alpha: float = hp(16.0, POSITIVE_NUMBER, "s = alpha/rank")
    rank_inflation: str = hp(
        "rri",
        one_of("rri", "shift"),
        hint="the reference's 'none' (no rank inflation) is not implemented",
    )
    side: str = hp("pre", one_of("pre", "post"), "which side of W the update multiplies")

    supported_ops: ClassVar[tuple[str, ...]] = ("linear", "addmm")

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def _n(self, site: Site) -> int:
        return site.out_features if self.side == "pre" else site.in_features

    def params(self, site: Site) -> dict[str, ParamSpec]:
        n, r = self._n(site), self.rank
        return {"lorma_A": ParamSpec((r, n)), "lorma_B": ParamSpec((n, r))}

    def init(self, site: Site, W: Tensor, calib: object, generator: torch.Generator) -> Params:
        n, r = self._n(site), self.rank
        A, B = torch.zeros(r, n), torch.zeros(n, r)
        if self.rank_inflation == "rri":
            torch.nn.init.kaiming_uniform_(A, a=math.sqrt(5), generator=generator)
        else:
            torch.nn.init.kaiming_uniform_(B, a=math.sqrt(5), generator=generator)
            B[:, 0] = 1.0
            A[0, 0] = 1.0
            A, B = A / math.sqrt(self.scaling), B / math.sqrt(self.scaling)
        return {"lorma_A": A.to(W.dtype), "lorma_B": B.to(W.dtype)}

    def _inflated(self, p: Params) -> Tensor:
        """s·shift(B·A) − I: the update of the shift form, zero at init. shift(M)'s diagonal is
        M's column 0, so I is subtracted there (no constant tensor in the traced graph)."""
        M = p["lorma_B"] @ p["lorma_A"] * self.scaling
        return shift(torch.cat([M[:, :1] - 1.0, M[:, 1:]], dim=1))

    def forward(
        self, x: Tensor, base_out: Tensor, W: Tensor, p: Params, ctx: SiteContext
    ) -> Tensor:
        A, B, s = p["lorma_A"], p["lorma_B"], self.scaling
        if self.side == "pre":  # x·(M·W)ᵀ = (x·Wᵀ)·Mᵀ: the base output without its bias
            h = base_out if ctx.bias is None else base_out - ctx.bias
            if self.rank_inflation == "rri":
                return base_out + F.linear(F.linear(h, A), B) * s
            return base_out + F.linear(h, self._inflated(p))
        if self.rank_inflation == "rri":
            return base_out + F.linear(F.linear(x, A), W @ B) * s
        return base_out + F.linear(x, W @ self._inflated(p))

    def merged_weight(self, site: Site, W: Tensor, p: Params) -> Tensor:
        """W' = W + s·B·A·W, s·shift(B·A)·W (pre) or W + s·W·B·A, s·W·shift(B·A) (post)."""
        A, B, s = p["lorma_A"], p["lorma_B"], self.scaling
        if self.rank_inflation == "rri":
            return W + (B @ (A @ W) if self.side == "pre" else (W @ B) @ A) * s
        M = shift(B @ A) * s
        return M @ W if self.side == "pre" else W @ M

    def cost(self, site: Site) -> Cost:
        n = D_OUT if self.side == "pre" else D_IN
        if self.rank_inflation == "rri" and self.side == "pre":
            # (base − b)·Aᵀ and ·Bᵀ per token
            flops = 4 * T * R * D_OUT + 3 * T * D_OUT
            saved = T * R
        elif self.rank_inflation == "rri":
            # W·B per step; x·Aᵀ, ·(W·B)ᵀ per token
            flops = 2 * D_OUT * D_IN * R + 2 * T * R * (D_IN + D_OUT) + 2 * T * D_OUT
            saved = T * R + D_OUT * R
        elif self.side == "pre":
            # B·A (out×out) per step; (base − b)·Mᵀ per token
            flops = 2 * R * D_OUT**2 + 2 * D_OUT**2 + 2 * T * D_OUT**2 + 3 * T * D_OUT
            saved = T * D_OUT + D_OUT**2
        else:
            # B·A (in×in) and W·M (out×in·in) per step; x·ΔWᵀ per token
            flops = 2 * R * D_IN**2 + 2 * D_IN**2 + 2 * D_OUT * D_IN**2
            flops += 2 * T * D_IN * D_OUT + T * D_OUT
            saved = D_IN**2 + D_OUT * D_IN
        return Cost(
            params=2 * R * n,
            flops_forward=flops,
            flops_backward=2 * flops,
            activation_bytes=saved * dtype_bytes(site.dtype),
            symbols=site_symbols(site, self.rank),
        )
