"""LoLDU: W_eff = W_res + c·P·L_r·diag(z)·U_r, only the r diagonal values z train.

Shi et al., "LoLDU: Low-Rank Adaptation via Lower-Diag-Upper Decomposition for
Parameter-Efficient Fine-Tuning" (arXiv 2410.13618). With W = P·L·U (torch.linalg.lu, partial
pivoting), D = diag(U) and U ← U/D: L_r = L[:, :r], U_r = U[:r] (the first r pivots) are
frozen, z = D[:r] trains (r values) and c = alpha/rank. W_res = W − c·P·L_r·diag(z₀)·U_r, so
the model starts as the identity; merged = W_eff.

peftc never stores W_res (a second copy of W): W_eff = W + c·P·L_r·diag(z − z₀)·U_r, with z₀
frozen, is the same weight, so a linear adds the rank-r path x·U_rᵀ·diag(c·(z − z₀))·L_rᵀ
and then applies P. P is an index vector (P·X = X[perm]), not a dense out×out matrix. The
LU runs in fp32 (W.float()); a zero pivot divides by 1 instead (its row of U_r is then
unscaled; z₀ = 0 there, and W_eff is still W at init). Everything frozen is derived from W, so
a checkpoint holds z only. Layers: linear (and addmm), conv2d with the weight viewed
out×(in/groups·kh·kw) (ΔW applied with the base's stride, padding, dilation and groups), and
embedding, whose stored [vocab, dim] weight is the factored matrix.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F

from passes.adapters.base import Params, ParamSpec, SiteContext, Tensor
from passes.adapters.contract import POSITIVE_INT, POSITIVE_NUMBER, Method, hp
from passes.adapters.cost import D_IN, D_OUT, Cost, R, T, dtype_bytes, site_symbols
from passes.adapters.registry import register
from rewrite.sites import Site


def _rows_cols(site: Site) -> tuple[int, int]:
    """The factored matrix's shape: [out, in] ([out, in/groups·kh·kw] for conv, [vocab, dim]
    for an embedding)."""
    if site.op == "embedding":
        return site.in_features, site.out_features
    if site.conv is not None:
        return site.out_features, site.weight_shape[1] * math.prod(site.conv.kernel)
    return site.out_features, site.in_features


@register("loldu")
class LoLDU(Method):
    rank: int = hp(8, POSITIVE_INT, "the number of LU pivots that train")
    alpha: float = hp(1.0, POSITIVE_NUMBER, "c = alpha/rank scales the diagonal")

    supported_ops: ClassVar[tuple[str, ...]] = ("linear", "addmm", "conv2d", "embedding")

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def check_site(self, site: Site) -> str | None:
        rows, cols = _rows_cols(site)
        if self.rank > min(rows, cols):
            return (
                f"rank {self.rank} is more than the {min(rows, cols)} pivots of the layer's "
                f"{rows}×{cols} weight (LU has min(rows, cols)); lower the rank"
            )
        return None

    def params(self, site: Site) -> dict[str, ParamSpec]:
        rows, cols, r = *_rows_cols(site), self.rank
        return {
            "loldu_z": ParamSpec((r,)),
            "loldu_z0": ParamSpec((r,), trainable=False),
            "loldu_L": ParamSpec((rows, r), trainable=False),
            "loldu_U": ParamSpec((r, cols), trainable=False),
            "loldu_perm": ParamSpec((rows,), trainable=False, dtype=torch.int64),
        }

    def init(self, site: Site, W: Tensor, calib: object, generator: torch.Generator) -> Params:
        P, L, U = torch.linalg.lu(W.detach().float().reshape(W.shape[0], -1))
        D = torch.diagonal(U)
        U = U / torch.where(D == 0, torch.ones_like(D), D)[:, None]
        r, dt = self.rank, W.dtype
        z0 = D[:r].to(dt)
        return {
            "loldu_z": z0.clone(),
            "loldu_z0": z0,
            "loldu_L": L[:, :r].to(dt).contiguous(),
            "loldu_U": U[:r].to(dt).contiguous(),
            "loldu_perm": P.argmax(dim=1),  # (P·X)[i] = X[perm[i]]
        }

    def _delta(self, p: Params) -> Tensor:
        """c·P·L_r·diag(z − z₀)·U_r, [rows, cols]."""
        L = p["loldu_L"].index_select(0, p["loldu_perm"].long())
        dz = (p["loldu_z"] - p["loldu_z0"]) * self.scaling
        return (L * dz) @ p["loldu_U"]

    def forward(
        self, x: Tensor, base_out: Tensor, W: Tensor, p: Params, ctx: SiteContext
    ) -> Tensor:
        site, dz = ctx.site, (p["loldu_z"] - p["loldu_z0"]) * self.scaling
        if site.op == "embedding":  # rows of P·L_r picked by the token ids
            rows = F.embedding(x, p["loldu_L"].index_select(0, p["loldu_perm"]))
            return base_out + (rows * dz) @ p["loldu_U"]
        if site.conv is not None:
            g = site.conv
            delta = self._delta(p).view(W.shape)
            return base_out + F.conv2d(x, delta, None, g.stride, g.padding, g.dilation, g.groups)
        latent = F.linear(x, p["loldu_U"]) * dz
        return base_out + F.linear(latent, p["loldu_L"]).index_select(-1, p["loldu_perm"])

    def merged_weight(self, site: Site, W: Tensor, p: Params) -> Tensor:
        """W_eff = W + c·P·L_r·diag(z − z₀)·U_r, in W's own layout."""
        return W + self._delta(p).view(W.shape)

    def cost(self, site: Site) -> Cost:
        if site.op == "embedding":  # [vocab, dim]: a row gather of P·L_r, then [r] x [r, dim]
            flops_forward = D_IN * R + T * R + 2 * T * R * D_OUT + T * D_OUT
            saved = T * R
        elif site.conv is not None:  # ΔW [out, in/g·k] rebuilt, then a conv per position
            cols = D_IN * math.prod(site.conv.kernel) / site.conv.groups
            flops_forward = 2 * R * cols * D_OUT + 2 * T * cols * D_OUT + T * D_OUT
            saved = cols * D_OUT
        else:  # x·U_rᵀ, the scale, ·L_rᵀ, the gather and the add
            flops_forward = 2 * T * R * (D_IN + D_OUT) + T * R + 2 * T * D_OUT
            saved = 2 * T * R
        return Cost(
            params=R,
            flops_forward=flops_forward,
            flops_backward=2 * flops_forward,
            activation_bytes=saved * dtype_bytes(site.dtype),
            symbols=site_symbols(site, self.rank),
        )
