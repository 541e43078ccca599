"""HRA: y = x (W H)ᵀ + b, H = Π_i (I - 2 u_i u_iᵀ / |u_i|²), a chain of r Householder reflections.

Yuan et al., "Bridging The Gap between Low-rank and Orthogonal Adaptation via Householder
Reflection Adaptation" (NeurIPS 2024). U [fan_in, r] trains. With apply_GS the columns are
Gram-Schmidt orthonormalised first, so H = I - 2 Q Qᵀ. PEFT's init repeats each column twice
(even r), so the reflections cancel pairwise and the adapter starts as the identity.

The product W H is never formed in the forward: with the compact WY form of the chain,
x (W H)ᵀ = base(x) - 2 (x U) K, K [r, out] from the r×r Gram matrix, so the adapter costs what a
rank-r LoRA costs. Convolutions (PEFT: square kernels) use the same factors as two convs.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F

from passes.adapters.base import Params, ParamSpec, SiteContext, Tensor
from passes.adapters.contract import FLAG, POSITIVE_INT, Method, hp
from passes.adapters.cost import D_IN, D_OUT, Cost, R, T, dtype_bytes
from passes.adapters.peft_record import PeftField, PeftFormat
from passes.adapters.registry import register
from rewrite.sites import Site


def _fan_in(site: Site) -> int:
    return site.in_features * math.prod(site.conv.kernel) if site.conv else site.in_features


@register("hra")
class HRA(Method):
    rank: int = hp(8, POSITIVE_INT)
    apply_GS: bool = hp(False, FLAG)  # noqa: N815 (PEFT's name)
    init_weights: bool = hp(True, FLAG)

    supported_ops: ClassVar[tuple[str, ...]] = ("linear", "conv2d")  # as PEFT's HRA
    peft = PeftFormat(
        peft_type="HRA",
        config="HRAConfig",
        fields={
            "rank": PeftField("r", 8, read=int),
            "apply_GS": PeftField("apply_GS", False, read=bool),
            "init_weights": PeftField("init_weights", True, read=bool),
        },
        keys={"hra_u": "hra_u"},
    )

    def check_site(self, site: Site) -> str | None:
        g = site.conv
        if g is not None:
            if g.groups != 1 or set(g.dilation) != {1}:
                return "hra supports convolutions with groups=1 and dilation=1 only"
            sides = (g.kernel, g.padding, g.stride)
            if isinstance(g.padding, str) or any(len(set(t)) != 1 for t in sides):
                return "hra supports square kernels with equal stride and padding per side only"
        if self.apply_GS and self.rank > _fan_in(site):
            return (
                f"rank {self.rank} is more than the {_fan_in(site)} input features that "
                "Gram-Schmidt can orthonormalise; lower the rank or set apply_GS false"
            )
        return None

    def params(self, site: Site) -> dict[str, ParamSpec]:
        return {"hra_u": ParamSpec((_fan_in(site), self.rank))}

    def init(self, site: Site, W: Tensor, calib: object, generator: torch.Generator) -> Params:
        d, r = _fan_in(site), self.rank
        # PEFT's symmetric init repeats each column, so the reflections cancel in pairs. Odd r
        # cannot be symmetric, and with apply_GS repeated columns would orthonormalise to 0/0
        # (NaN in PEFT) and I - 2QQᵀ is never the identity anyway: those start random.
        symmetric = self.init_weights and r % 2 == 0 and not self.apply_GS
        u = torch.empty(d, r // 2 if symmetric else r)
        torch.nn.init.kaiming_uniform_(u, a=math.sqrt(5), generator=generator)
        if symmetric:
            u = torch.repeat_interleave(u, 2, dim=1)
        return {"hra_u": u.to(W.dtype)}

    def _factors(self, W: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(U [d, r], K [r, out]) with W H - W = -2 Kᵀ Uᵀ, W the [out, d] weight."""
        r = self.rank
        if self.apply_GS:  # PEFT's Gram-Schmidt of the raw columns: H = I - 2 Q Qᵀ
            cols = [u[:, 0] / u[:, 0].norm()]
            for i in range(1, r):
                v = u[:, i]
                for q in cols:
                    v = v - (q @ v) * q
                cols.append(v / v.norm())
            Q = torch.stack(cols, dim=1)
            return Q, (W @ Q).t()
        U = u / u.norm(dim=0)
        gram = U.t() @ U
        V = W @ U  # [out, r]
        # H = H_0 … H_{r-1}; the compact WY form: K_j = V_j - 2 Σ_{i<j} G_ji K_i
        rows = []
        for j in range(r):
            k = V[:, j]
            for i in range(j):
                k = k - 2 * gram[j, i] * rows[i]
            rows.append(k)
        return U, torch.stack(rows, dim=0)

    def forward(
        self, x: Tensor, base_out: Tensor, W: Tensor, p: Params, ctx: SiteContext
    ) -> Tensor:
        site, g = ctx.site, ctx.site.conv
        W2 = W.flatten(1) if g is not None else W
        U, K = self._factors(W2, p["hra_u"])
        if g is not None:
            project = U.t().reshape(self.rank, site.in_features, *g.kernel)
            h = F.conv2d(x, project, None, g.stride, g.padding)
            return base_out + F.conv2d(h, (-2 * K).t()[:, :, None, None])
        return base_out + F.linear(F.linear(x, U.t()), -2 * K.t())

    def merged_weight(self, site: Site, W: Tensor, p: Params) -> Tensor:
        """W H (PEFT's merge: W @ get_delta_weight), for convs on the [out, in·k·k] view."""
        W2 = W.flatten(1)
        U, K = self._factors(W2, p["hra_u"])
        return (W2 - 2 * K.t() @ U.t()).view(W.shape)

    def cost(self, site: Site) -> Cost:
        k = math.prod(site.conv.kernel) if site.conv else 1
        # per step: normalise U, the Gram matrix and W U (independent of the tokens), then
        # two thin matmuls over the tokens, like a rank-r LoRA
        weight_side = 2 * D_OUT * D_IN * k * R + 2 * R * R * (D_IN * k + D_OUT)
        flops_forward = weight_side + 2 * T * R * (D_IN * k + D_OUT) + T * D_OUT
        return Cost(
            params=R * D_IN * k,
            flops_forward=flops_forward,
            flops_backward=2 * flops_forward,
            activation_bytes=(T * R + R * D_OUT) * dtype_bytes(site.dtype),
            symbols={D_IN: site.in_features, D_OUT: site.out_features, R: self.rank},
        )
