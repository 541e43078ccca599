"""VeRA: y = base(x) + b ⊙ (B_s (d ⊙ (A_s dropout(x)))), with A, B frozen and random.

Kopiczko et al., "VeRA: Vector-based Random Matrix Adaptation" (ICLR 2024).
One Kaiming-uniform pair A [r, max_in], B [max_out, r] (seeded by `projection_prng_key`, as
PEFT's VeraModel does) is shared by every adapted layer; each layer slices A_s = A[:, :in],
B_s = B[:out, :] and trains only the vectors d [r] (init d_initial) and b [out] (init 0, so
the adapter starts as the identity).
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
import torch.nn.functional as F

from passes.adapters.base import Params, ParamSpec, SiteContext, Tensor
from passes.adapters.contract import Rule, hp
from passes.adapters.cost import D_IN, D_OUT, Cost, R, T, dtype_bytes, site_symbols
from passes.adapters.peft_record import PeftField
from passes.adapters.registry import register
from passes.adapters.shared_projection import SharedProjection, projection_format
from rewrite.sites import Site

FINITE = Rule("a finite number", lambda v: isinstance(v, int | float) and math.isfinite(v))


@lru_cache(maxsize=4)
def _projections(key: int, rank: int, n_in: int, n_out: int) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's `_kaiming_init` of vera_A then vera_B from one generator seeded with `key`."""
    generator = torch.Generator(device="cpu").manual_seed(key)
    out = []
    for shape in ((rank, n_in), (n_out, rank)):
        bound = math.sqrt(3.0) * math.sqrt(2.0) / math.sqrt(shape[1])
        out.append(torch.empty(shape).uniform_(-bound, bound, generator=generator))
    return out[0], out[1]


@register("vera")
class VeRA(SharedProjection):
    d_initial: float = hp(0.1, FINITE)

    peft = projection_format(
        "VERA",
        "VeraConfig",
        "vera",
        256,
        trained=("vera_lambda_d", "vera_lambda_b"),
        fields={
            "d_initial": PeftField("d_initial", 0.1, init_only=True),
            "init_weights": PeftField("init_weights", True, read=bool),
        },
    )

    def params(self, site: Site) -> dict[str, ParamSpec]:
        n_in, n_out = self._shared_dims(site)
        return {
            "vera_lambda_d": ParamSpec((self.rank,)),
            "vera_lambda_b": ParamSpec((site.out_features,)),
            "vera_A": ParamSpec((self.rank, n_in), trainable=False, shared=True),
            "vera_B": ParamSpec((n_out, self.rank), trainable=False, shared=True),
        }

    def init(self, site: Site, W: Tensor, calib: object, generator: torch.Generator) -> Params:
        A, B = _projections(self.projection_prng_key, self.rank, *self._shared_dims(site))
        if self.init_weights:
            d = torch.full((self.rank,), float(self.d_initial))
            b = torch.zeros(site.out_features)
        else:  # PEFT: d ~ N(0, 1), b = 1
            d = torch.randn(self.rank, generator=generator)
            b = torch.ones(site.out_features)
        values = {"vera_lambda_d": d, "vera_lambda_b": b, "vera_A": A, "vera_B": B}
        return {name: v.to(W.dtype) for name, v in values.items()}

    def forward(
        self, x: Tensor, base_out: Tensor, W: Tensor, p: Params, ctx: SiteContext
    ) -> Tensor:
        site = ctx.site
        A = p["vera_A"][:, : site.in_features]
        B = p["vera_B"][: site.out_features, :]
        h = F.dropout(x, self.dropout, ctx.training) if self.dropout > 0 else x
        return base_out + p["vera_lambda_b"] * F.linear(p["vera_lambda_d"] * F.linear(h, A), B)

    def merged_weight(self, site: Site, W: Tensor, p: Params) -> Tensor:
        """W + diag(b) B_s diag(d) A_s, as PEFT's get_delta_weight."""
        A = p["vera_A"][:, : site.in_features]
        B = p["vera_B"][: site.out_features, :]
        return W + (p["vera_lambda_b"].unsqueeze(-1) * B) @ (p["vera_lambda_d"].unsqueeze(-1) * A)

    def cost(self, site: Site) -> Cost:
        # A and B are frozen and shared: only d and b train.
        flops_forward = 2 * T * R * (D_IN + D_OUT) + T * R + 2 * T * D_OUT
        dropped = D_IN if self.dropout > 0 else 0
        return Cost(
            params=R + D_OUT,
            flops_forward=flops_forward,
            flops_backward=2 * flops_forward,
            activation_bytes=T * (2 * R + dropped) * dtype_bytes(site.dtype),
            symbols=site_symbols(site, self.rank),
        )
