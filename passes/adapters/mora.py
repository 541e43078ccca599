"""MoRA: y = base(x) + decompress(M · compress(x)), one square trainable M (r̂×r̂), r̂ ≈ √((in+out)·r).

Jiang et al., "MoRA: High-Rank Updating for Parameter-Efficient Fine-Tuning" (arXiv 2405.12130).
`rank` is the LoRA-equivalent budget: r̂ = int(√((in + out)·rank) + 0.5), rounded down to even
for type 6, so M has about as many entries as a rank-`rank` LoRA. M starts at zero (the
identity); there is no scale. x is padded by wrap-around to rb = ⌈in/r̂⌉ blocks of r̂
(x_pad[i] = x[i mod in]), then:
- type 1 (sharing): the blocks are summed, M maps the sum, and its r̂ outputs are tiled to out;
- type 6 (RoPE): block i is rotated by RoPE at position i (inv_freq_k = 1/10000^(2k/r̂),
  half-split), M maps each block, the blocks are concatenated and cut (or tiled) to out.
Both are linear in x, so ΔW = f(I_in)ᵀ: the merge applies the forward's own operator to the
identity (in fp32), which also covers in ≤ r̂, where the reference's type-6 merge crashes.
"""

from __future__ import annotations

import math
from typing import ClassVar

import sympy
import torch
import torch.nn.functional as F

from passes.adapters.base import Params, ParamSpec, SiteContext, Tensor
from passes.adapters.contract import POSITIVE_INT, PROBABILITY, Method, hp, one_of
from passes.adapters.cost import D_IN, D_OUT, Cost, R, T, dtype_bytes, site_symbols
from passes.adapters.registry import register
from rewrite.sites import Site


def mora_rank(in_features: int, out_features: int, rank: int, mora_type: int) -> int:
    r = int(math.sqrt((in_features + out_features) * rank) + 0.5)
    return r // 2 * 2 if mora_type == 6 else r


def _tile(x: Tensor, n: int) -> Tensor:
    """x's last dim repeated (wrap-around) and cut to n."""
    reps = -(-n // x.shape[-1])
    return (torch.cat([x] * reps, dim=-1) if reps > 1 else x)[..., :n]


def rope_tables(blocks: int, r: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """cos and sin [blocks, r] of RoPE at positions 0..blocks-1, half-split, in fp32."""
    inv_freq = 1.0 / (10000 ** (torch.arange(0, r, 2, device=device, dtype=torch.float32) / r))
    freqs = torch.outer(torch.arange(blocks, device=device, dtype=torch.float32), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def apply_mora(x: Tensor, M: Tensor, mora_type: int, out_features: int) -> Tensor:
    """The MoRA update of x [..., in] with M [r̂, r̂]: [..., out]."""
    r, n_in = M.shape[0], x.shape[-1]
    blocks = -(-n_in // r)
    xb = _tile(x, blocks * r).unflatten(-1, (blocks, r))  # [..., rb, r̂]
    if mora_type == 1:
        return _tile(F.linear(xb.sum(-2), M), out_features)
    cos, sin = rope_tables(blocks, r, x.device)
    rotated = torch.cat((-xb[..., r // 2 :], xb[..., : r // 2]), dim=-1)
    xb = xb * cos.to(x.dtype) + rotated * sin.to(x.dtype)
    return _tile(F.linear(xb, M).flatten(-2), out_features)


@register("mora")
class MoRA(Method):
    rank: int = hp(8, POSITIVE_INT, "the LoRA-equivalent budget")
    mora_type: int = hp(1, one_of(1, 6), "1: sharing, 6: RoPE")
    dropout: float = hp(0.0, PROBABILITY)

    supported_ops: ClassVar[tuple[str, ...]] = ("linear", "addmm")

    def r_hat(self, site: Site) -> int:
        return mora_rank(site.in_features, site.out_features, self.rank, self.mora_type)

    def check_site(self, site: Site) -> str | None:
        if self.mora_type == 6 and self.r_hat(site) < 2:
            return (
                f"mora type 6 needs an even block size r̂ >= 2, but rank {self.rank} gives "
                f"r̂ = {self.r_hat(site)} at in={site.in_features}, out={site.out_features}; "
                "raise the rank or use mora_type 1"
            )
        return None

    def params(self, site: Site) -> dict[str, ParamSpec]:
        r = self.r_hat(site)
        return {"mora_M": ParamSpec((r, r))}

    def init(self, site: Site, W: Tensor, calib: object, generator: torch.Generator) -> Params:
        r = self.r_hat(site)
        return {"mora_M": torch.zeros(r, r, dtype=W.dtype)}

    def forward(
        self, x: Tensor, base_out: Tensor, W: Tensor, p: Params, ctx: SiteContext
    ) -> Tensor:
        h = F.dropout(x, self.dropout, ctx.training) if self.dropout > 0 else x
        return base_out + apply_mora(h, p["mora_M"], self.mora_type, ctx.site.out_features)

    def merged_weight(self, site: Site, W: Tensor, p: Params) -> Tensor:
        """W + ΔW, ΔW[:, j] = the update of the unit input e_j (built in fp32)."""
        eye = torch.eye(site.in_features, dtype=torch.float32, device=W.device)
        delta = apply_mora(eye, p["mora_M"].float(), self.mora_type, site.out_features).t()
        return W + delta.to(W.dtype)

    def cost(self, site: Site) -> Cost:
        r_hat = sympy.floor(sympy.sqrt((D_IN + D_OUT) * R) + sympy.Rational(1, 2))
        if self.mora_type == 6:
            r_hat = sympy.floor(r_hat / 2) * 2
        blocks = sympy.ceiling(D_IN / r_hat)
        if self.mora_type == 1:  # pad and sum the blocks, one [r̂]x[r̂, r̂] matmul, tile, add
            flops_forward = T * blocks * r_hat + 2 * T * r_hat**2 + T * D_OUT
            saved = T * r_hat  # the block sum, for M's gradient
        else:  # rotate every block (3 ops an entry), one matmul per block, add
            flops_forward = 3 * T * blocks * r_hat + 2 * T * blocks * r_hat**2 + T * D_OUT
            saved = T * blocks * r_hat  # the rotated blocks
        saved += T * D_IN if self.dropout > 0 else 0
        return Cost(
            params=r_hat**2,
            flops_forward=flops_forward,
            flops_backward=2 * flops_forward,
            activation_bytes=saved * dtype_bytes(site.dtype),
            symbols=site_symbols(site, self.rank),
        )
