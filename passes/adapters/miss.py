"""MiSS (matrix shard sharing): y = base(x) + (Σ_j x_j) D, x_j the r-wide shards of x, D [r, out].

Kang et al., "MiSS: Balancing LoRA Performance and Efficiency with Simple Shard Sharing"
(arXiv 2409.15371, first titled Bone). The input is cut into ⌈in/r⌉ shards of r features (the
last zero-padded); their sum goes through one trainable D. As a weight, ΔW = [Dᵀ Dᵀ … Dᵀ]
(Dᵀ tiled along in_features, cut to in), independent of W. This is PEFT's MissConfig default
(`init_weights=True`); its block-affine `init_weights="bat"` form is peftc's `bone`.

Hyperparameters: `rank` is PEFT's r (the shard width; r ≤ in_features, need not divide it).
`mini_r` selects PEFT's "mini" form: None (the default) trains D [r, out] itself; an integer
trains a [r, mini_r] block that is tiled out_features/mini_r times along out to make D, so
mini_r must divide out_features. D starts at zero (the identity); `init_weights: false` is
PEFT's other default-form init, Kaiming-uniform (not the identity). PEFT's mini form always
starts at zero, so mini_r with init_weights false is refused. `dropout` (PEFT's miss_dropout)
applies to x before the shard sum.
"""

from __future__ import annotations

import math

import sympy
import torch
import torch.nn.functional as F

from passes.adapters.base import Params, ParamSpec, SiteContext, Tensor
from passes.adapters.contract import FLAG, POSITIVE_INT, PROBABILITY, Method, hp, optional
from passes.adapters.cost import D_IN, D_OUT, Cost, R, T, dtype_bytes, site_symbols
from passes.adapters.peft_record import PeftField, PeftFormat
from passes.adapters.registry import register
from rewrite.sites import Site

MINI_R = sympy.Symbol("mini_r", positive=True, integer=True)


def full_block(block: torch.Tensor, out_features: int) -> torch.Tensor:
    """D [r, out]: the trained block itself, or a mini block [r, mini_r] tiled along out."""
    reps = out_features // block.shape[1]
    return block if reps == 1 else block.repeat(1, reps)


def shard_sum(x: torch.Tensor, r: int) -> torch.Tensor:
    """Σ_j x_j over the r-wide shards of x's last dim, zero-padding the last shard (PEFT's pad)."""
    pad = -x.shape[-1] % r
    if pad:
        x = F.pad(x, (0, pad))
    return x.unflatten(-1, (x.shape[-1] // r, r)).sum(-2)


def shard_delta(block: torch.Tensor, out_features: int, in_features: int) -> torch.Tensor:
    """ΔW [out, in]: Dᵀ repeated along in_features and cut to in_features."""
    D = full_block(block, out_features)
    return D.t().repeat(1, math.ceil(in_features / D.shape[0]))[:, :in_features]


@register("miss")
class MiSS(Method):
    rank: int = hp(64, POSITIVE_INT, "the shard width")  # PEFT's MissConfig.r
    # None: PEFT's default form; an int: its "mini" form
    mini_r: int | None = hp(
        None, optional(POSITIVE_INT, "the default form"), hint="an integer selects PEFT's mini form"
    )
    dropout: float = hp(0.0, PROBABILITY)  # PEFT's miss_dropout
    # True: zeros (the identity); False: PEFT's Kaiming-uniform
    init_weights: bool = hp(
        True,
        FLAG,
        hint="for PEFT's init_weights='mini' set mini_r, for 'bat' use the bone method",
    )

    peft = PeftFormat(
        peft_type="MISS",
        config="MissConfig",
        when={"init_weights": (True, False, "mini")},  # bone claims "bat"
        fields={
            "rank": PeftField("r", 64, read=int),
            "dropout": PeftField("miss_dropout", 0.0, read=float),
            # PEFT reads mini_r (default 1) only in the mini form, and writes 1 when unused.
            "mini_r": PeftField(
                "mini_r",
                1,
                from_config=lambda c: (
                    int(c.get("mini_r", 1)) if c.get("init_weights") == "mini" else None
                ),
                from_method=lambda m: m.mini_r or 1,
            ),
            "init_weights": PeftField(
                "init_weights",
                True,
                from_config=lambda c: c.get("init_weights", True) is not False,
                from_method=lambda m: "mini" if m.mini_r is not None else m.init_weights,
            ),
        },
        keys={"miss_block": "miss_block"},
    )

    def validate(self) -> None:
        if self.mini_r is not None and not self.init_weights:
            raise ValueError(
                "miss: init_weights false (PEFT's random init) exists for the default form "
                "only; PEFT's mini form always starts at zero, so drop mini_r or init_weights"
            )

    def check_site(self, site: Site) -> str | None:
        if self.rank > site.in_features:
            return (
                f"rank={self.rank} is wider than in_features {site.in_features}; miss cuts the "
                f"input into r-wide shards, so pick r ≤ {site.in_features}"
            )
        if self.mini_r is not None and site.out_features % self.mini_r:
            return (
                f"mini_r={self.mini_r} does not divide out_features {site.out_features}; the "
                f"mini block is tiled along out_features, so pick mini_r dividing "
                f"{site.out_features}"
            )
        return None

    def params(self, site: Site) -> dict[str, ParamSpec]:
        return {"miss_block": ParamSpec((self.rank, self.mini_r or site.out_features))}

    def init(self, site: Site, W: Tensor, calib: object, generator: torch.Generator) -> Params:
        block = torch.zeros(self.params(site)["miss_block"].shape, dtype=torch.float32)
        if not self.init_weights:  # PEFT's reset_miss_parameters_random
            torch.nn.init.kaiming_uniform_(block, a=math.sqrt(5), generator=generator)
        return {"miss_block": block.to(W.dtype)}

    def forward(
        self, x: Tensor, base_out: Tensor, W: Tensor, p: Params, ctx: SiteContext
    ) -> Tensor:
        # Never forms ΔW: the shard sum is [T, r], so this costs what a rank-r LoRA's B does.
        h = F.dropout(x, self.dropout, ctx.training) if self.dropout > 0 else x
        D = full_block(p["miss_block"], ctx.site.out_features)
        return base_out + shard_sum(h, self.rank) @ D

    def merged_weight(self, site: Site, W: Tensor, p: Params) -> Tensor:
        """W + ΔW in the site's [out, in] layout (PEFT's get_delta_weight_miss)."""
        return W + shard_delta(p["miss_block"], site.out_features, site.in_features)

    def cost(self, site: Site) -> Cost:
        cols = D_OUT if self.mini_r is None else MINI_R
        symbols = site_symbols(site, self.rank)
        if self.mini_r is not None:
            symbols[MINI_R] = self.mini_r
        # per token: ~d_in adds for the shard sum, the [r] x [r, out] matmul, the residual add
        flops_forward = T * D_IN + 2 * T * R * D_OUT + T * D_OUT
        # kept for backward: the shard sums (B's gradient), dropout's input, and in the mini
        # form the tiled [r, out] block (the gradient flowing back to x)
        saved = T * R + (T * D_IN if self.dropout > 0 else 0)
        saved += R * D_OUT if self.mini_r is not None else 0
        return Cost(
            params=R * cols,
            flops_forward=flops_forward,
            flops_backward=2 * flops_forward,
            activation_bytes=saved * dtype_bytes(site.dtype),
            symbols=symbols,
        )
