"""FLoRA: ΔW = scale · G ×₀ P_in ×₁ P_out (×₂ P_kh ×₃ P_kw), a Tucker decomposition of ΔW.

Si et al., "FLoRA: Low-Rank Core Space for N-dimension" (arXiv 2405.14739); official code
SJTU-DeepVisionLab/FLoRA, flora/layers.py. The update keeps the layer's own N-dimensional
shape: a core G and one factor per dimension, all trainable.

- Linear: G (r×r), P_in (in×r), P_out (out×r); ΔW = scale·P_out·Gᵀ·P_inᵀ, so
  y = base(x) + scale·((x·P_in)·G)·P_outᵀ, never forming ΔW. r² + r·(in + out) parameters.
- Conv2d: a 4-way core G (r_in×r_out×r_kh×r_kw) and factors P_in (in/groups×r_in), P_out
  (out×r_out), P_kh (kh×r_kh), P_kw (kw×r_kw); ΔW[o,i,h,w] = scale·Σ G[a,b,c,d]·P_in[i,a]·
  P_out[o,b]·P_kh[h,c]·P_kw[w,d] has the base weight's shape [out, in/groups, kh, kw] and is
  applied with the base's stride, padding, dilation and groups (the official Conv2D).

Choices: `rank` sets every Tucker rank, r_in = r_out = rank, except that a kernel factor
cannot be wider than its kernel: r_kh = min(rank, kh), r_kw = min(rank, kw) (so a 1×1 conv
has a rank-1 kernel part, and a 3×3 conv at rank 8 a core of 8·8·3·3). The in factor spans
in/groups channels, the base weight's own in dimension, so a grouped conv's update stays
grouped and merges into the weight as it is. Init as the official code: G zeros (the
identity at init), every factor Kaiming-normal with a = √3 (fan-in: the factor's rank).
Merged: W + ΔW. `dropout` acts on the adapter's input.
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
    PROBABILITY,
    Method,
    hp,
    rank_too_large,
)
from passes.adapters.cost import D_IN, D_OUT, Cost, R, T, dtype_bytes, site_symbols
from passes.adapters.registry import register
from rewrite.sites import Site


@register("flora")
class FLoRA(Method):
    rank: int = hp(8, POSITIVE_INT, "every Tucker rank; kernel ranks are min(rank, k)")
    scale: float = hp(1.0, POSITIVE_NUMBER)
    dropout: float = hp(0.0, PROBABILITY)

    supported_ops: ClassVar[tuple[str, ...]] = ("linear", "addmm", "conv2d")

    def _ranks(self, site: Site) -> tuple[int, ...]:
        r = self.rank
        if site.conv is None:
            return (r, r)
        return (r, r, *(min(r, k) for k in site.conv.kernel))

    def _dims(self, site: Site) -> tuple[int, ...]:
        if site.conv is None:
            return (site.in_features, site.out_features)
        return (site.in_features // site.conv.groups, site.out_features, *site.conv.kernel)

    def check_site(self, site: Site) -> str | None:
        d_in, d_out = self._dims(site)[:2]
        kind = "in_channels/groups" if site.conv is not None else "in"
        return rank_too_large(self.rank, d_in, d_out, kind)

    def params(self, site: Site) -> dict[str, ParamSpec]:
        ranks, dims = self._ranks(site), self._dims(site)
        names = ("flora_in", "flora_out", "flora_kh", "flora_kw")
        out = {"flora_G": ParamSpec(ranks)}
        out.update({n: ParamSpec((d, r)) for n, d, r in zip(names, dims, ranks, strict=False)})
        return out

    def init(self, site: Site, W: Tensor, calib: object, generator: torch.Generator) -> Params:
        p = {}
        for name, spec in self.params(site).items():
            t = torch.zeros(spec.shape, dtype=torch.float32)
            if name != "flora_G":
                torch.nn.init.kaiming_normal_(t, a=math.sqrt(3), generator=generator)
            p[name] = t.to(W.dtype)
        return p

    def delta(self, p: Params) -> Tensor:
        """ΔW in the base weight's layout: [out, in] or [out, in/groups, kh, kw]."""
        if "flora_kh" not in p:
            return (p["flora_out"] @ p["flora_G"].t() @ p["flora_in"].t()) * self.scale
        d = torch.einsum(
            "abcd,ia,ob,hc,wd->oihw",
            p["flora_G"],
            p["flora_in"],
            p["flora_out"],
            p["flora_kh"],
            p["flora_kw"],
        )
        return d * self.scale

    def forward(
        self, x: Tensor, base_out: Tensor, W: Tensor, p: Params, ctx: SiteContext
    ) -> Tensor:
        h = F.dropout(x, self.dropout, ctx.training) if self.dropout > 0 else x
        g = ctx.site.conv
        if g is not None:
            return base_out + F.conv2d(
                h, self.delta(p), None, g.stride, g.padding, g.dilation, g.groups
            )
        latent = F.linear(F.linear(h, p["flora_in"].t()), p["flora_G"].t())
        return base_out + F.linear(latent, p["flora_out"]) * self.scale

    def merged_weight(self, site: Site, W: Tensor, p: Params) -> Tensor:
        """W + ΔW, ΔW in W's own (grouped, for a grouped conv) layout."""
        return W + self.delta(p)

    def cost(self, site: Site) -> Cost:
        symbols = site_symbols(site, self.rank)
        if site.conv is None:
            # x·P_in (r·in), ·G (r²), ·P_outᵀ (r·out) per token, then scale-and-add
            flops_forward = 2 * T * R * (D_IN + R + D_OUT) + 2 * T * D_OUT
            return Cost(
                params=R**2 + R * (D_IN + D_OUT),
                flops_forward=flops_forward,
                flops_backward=2 * flops_forward,
                activation_bytes=T
                * (2 * R + (D_IN if self.dropout > 0 else 0))
                * dtype_bytes(site.dtype),
                symbols=symbols,
            )
        g = site.conv.groups
        kh, kw = site.conv.kernel
        rh, rw = sympy.Min(R, kh), sympy.Min(R, kw)
        d_in = D_IN / g
        params = R**2 * rh * rw + R * (d_in + D_OUT) + rh * kh + rw * kw
        # building ΔW (the Tucker product, contracted one mode at a time, bounded by the
        # largest: out·in/g·kh·kw·r), then the extra conv per output position T
        build = 2 * R * D_OUT * d_in * kh * kw * 4
        flops_forward = build + 2 * T * D_OUT * d_in * kh * kw + T * D_OUT
        return Cost(
            params=params,
            flops_forward=flops_forward,
            flops_backward=2 * flops_forward,
            # the conv's input, kept for ΔW's gradient (about T positions of in channels)
            activation_bytes=T * D_IN * dtype_bytes(site.dtype),
            symbols=symbols,
        )
