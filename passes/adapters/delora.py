"""DeLoRA: y = base(x) + B·diag(λ/(r·‖a_i‖·‖b_i‖))·A·(‖W_:,c‖ ⊙ x).

Bini et al., "Decoupling Angles and Strength in Low-rank Adaptation" (ICLR 2025). Each rank-1
component b_i a_iᵀ is normalised, so A and B only set directions (angles) and the trainable
scalar λ alone sets the strength: ‖ΔW‖ is bounded by λ·‖W‖. The update is scaled per input
channel by the frozen column norms of the base weight, captured at init (PEFT's
`delora_w_norm` buffer, which is saved with the adapter). B starts at zero, so the adapter
starts as the identity. Parity target: PEFT DeloraConfig (nn.Linear only).
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F

from passes.adapters.base import Params, ParamSpec, SiteContext, Tensor
from passes.adapters.contract import FLAG, POSITIVE_INT, PROBABILITY, Method, Rule, at_least, hp
from passes.adapters.cost import D_IN, D_OUT, Cost, R, T, dtype_bytes, site_symbols
from passes.adapters.peft_record import PeftField, PeftFormat
from passes.adapters.registry import register
from rewrite.sites import Site

NORM_EPS = 1e-4  # PEFT clamps the rank-1 norms to at least this
NORM_BOUND = Rule(">= 0 and finite", lambda v: at_least(0).ok(v) and math.isfinite(v))


@register("delora")
class DeLoRA(Method):
    rank: int = hp(8, POSITIVE_INT)
    delora_lambda: float = hp(15.0, NORM_BOUND, "the norm bound")
    dropout: float = hp(0.0, PROBABILITY)
    init_weights: bool = hp(True, FLAG)  # False: B random too (PEFT's testing init)

    save_frozen: ClassVar[bool] = True  # delora_w_norm is part of PEFT's checkpoint
    peft = PeftFormat(
        peft_type="DELORA",
        config="DeloraConfig",
        fields={
            "rank": PeftField("r", 8, pattern="rank_pattern", read=int),
            "delora_lambda": PeftField("delora_lambda", 15, pattern="lambda_pattern"),
            "dropout": PeftField("module_dropout", 0.0, read=float),
            "init_weights": PeftField("init_weights", True, read=bool),
        },
        keys={n: n for n in ("delora_A", "delora_B", "delora_lambda", "delora_w_norm")},
    )

    def params(self, site: Site) -> dict[str, ParamSpec]:
        r = self.rank
        return {
            "delora_A": ParamSpec((r, site.in_features)),
            "delora_B": ParamSpec((site.out_features, r)),
            "delora_lambda": ParamSpec((1,)),
            "delora_w_norm": ParamSpec((site.in_features,), trainable=False),
        }

    def init(self, site: Site, W: Tensor, calib: object, generator: torch.Generator) -> Params:
        A = torch.empty(self.rank, site.in_features)
        torch.nn.init.kaiming_uniform_(A, a=math.sqrt(5), generator=generator)
        B = torch.zeros(site.out_features, self.rank)
        if not self.init_weights:
            torch.nn.init.kaiming_uniform_(B, a=math.sqrt(5), generator=generator)
        return {
            "delora_A": A.to(W.dtype),
            "delora_B": B.to(W.dtype),
            "delora_lambda": torch.full((1,), float(self.delora_lambda), dtype=W.dtype),
            "delora_w_norm": torch.linalg.vector_norm(W.detach(), dim=0),
        }

    def _scale(self, p: dict[str, torch.Tensor]) -> torch.Tensor:
        """λ/r / (‖a_i‖·‖b_i‖) per rank component."""
        An = torch.clamp(p["delora_A"].norm(dim=1), min=NORM_EPS)
        Bn = torch.clamp(p["delora_B"].norm(dim=0), min=NORM_EPS)
        return (p["delora_lambda"] / self.rank) / (An * Bn)

    def forward(
        self, x: Tensor, base_out: Tensor, W: Tensor, p: Params, ctx: SiteContext
    ) -> Tensor:
        h = F.dropout(x, self.dropout, ctx.training) if self.dropout > 0 else x
        h = F.linear(h * p["delora_w_norm"], p["delora_A"]) * self._scale(p)
        return base_out + F.linear(h, p["delora_B"])

    def merged_weight(self, site: Site, W: Tensor, p: Params) -> Tensor:
        """W + B·diag(scale)·A·diag(w_norm) in the site's [out, in] layout."""
        delta = (p["delora_B"] * self._scale(p)) @ p["delora_A"]
        return W + delta * p["delora_w_norm"].unsqueeze(0)

    def cost(self, site: Site) -> Cost:
        flops_forward = T * D_IN + 2 * T * R * (D_IN + D_OUT) + T * (R + D_OUT)
        return Cost(
            params=R * (D_IN + D_OUT) + 1,
            flops_forward=flops_forward,
            flops_backward=2 * flops_forward,
            activation_bytes=T * (D_IN + R) * dtype_bytes(site.dtype),
            symbols=site_symbols(site, self.rank),
        )
