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
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from passes.adapters.base import (
    D_IN,
    D_OUT,
    Cost,
    ParamSpec,
    R,
    SiteContext,
    T,
    dtype_bytes,
    is_int,
    peft_pattern_value,
    site_symbols,
)
from passes.adapters.registry import register
from rewrite.sites import Site

NORM_EPS = 1e-4  # PEFT clamps the rank-1 norms to at least this


@register("delora")
@dataclass(frozen=True)
class DeLoRA:
    rank: int = 8
    delora_lambda: float = 15.0
    dropout: float = 0.0
    init_weights: bool = True  # False: B random too (PEFT's testing init)

    supported_ops: ClassVar[tuple[str, ...]] = ("linear",)
    mergeable: ClassVar[bool] = True
    peft_type: ClassVar[str] = "DELORA"
    save_frozen: ClassVar[bool] = True  # delora_w_norm is part of PEFT's checkpoint

    def __post_init__(self) -> None:
        if not is_int(self.rank) or self.rank <= 0:
            raise ValueError(f"delora: rank must be a positive integer, got {self.rank!r}")
        lam = self.delora_lambda
        if not isinstance(lam, int | float) or isinstance(lam, bool) or not math.isfinite(lam):
            raise ValueError(f"delora: delora_lambda must be a finite number, got {lam!r}")
        if lam < 0:
            raise ValueError(f"delora: delora_lambda (the norm bound) must be >= 0, got {lam!r}")
        if not isinstance(self.dropout, int | float) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"delora: dropout must be in [0, 1), got {self.dropout!r}")
        if not isinstance(self.init_weights, bool):
            raise ValueError(
                f"delora: init_weights must be true or false, got {self.init_weights!r}"
            )

    def check(self, site: Site) -> str | None:
        """Why this method cannot adapt `site`, or None when it can."""
        if site.op not in self.supported_ops:
            return f"delora supports linear layers only (as PEFT does), not {site.op} sites"
        return None

    def params(self, site: Site) -> dict[str, ParamSpec]:
        r = self.rank
        return {
            "delora_A": ParamSpec((r, site.in_features)),
            "delora_B": ParamSpec((site.out_features, r)),
            "delora_lambda": ParamSpec((1,)),
            "delora_w_norm": ParamSpec((site.in_features,), trainable=False),
        }

    def init(
        self, site: Site, W: torch.Tensor, calib: object, generator: torch.Generator
    ) -> dict[str, torch.Tensor]:
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
        self,
        x: torch.Tensor,
        base_out: torch.Tensor,
        W: torch.Tensor,
        p: dict[str, torch.Tensor],
        ctx: SiteContext,
    ) -> torch.Tensor:
        h = F.dropout(x, self.dropout, ctx.training) if self.dropout > 0 else x
        h = F.linear(h * p["delora_w_norm"], p["delora_A"]) * self._scale(p)
        return base_out + F.linear(h, p["delora_B"])

    def merged_weight(
        self, site: Site, W: torch.Tensor, p: dict[str, torch.Tensor]
    ) -> torch.Tensor:
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

    def peft_keys(self, site: Site) -> dict[str, str]:
        return {n: n for n in ("delora_A", "delora_B", "delora_lambda", "delora_w_norm")}

    @classmethod
    def claims_peft(cls, config: dict) -> bool:
        return config.get("peft_type") == "DELORA"

    @classmethod
    def hyperparams_from_peft(cls, config: dict) -> dict:
        return {
            "rank": int(config.get("r", 8)),
            "delora_lambda": config.get("delora_lambda", 15),
            "dropout": float(config.get("module_dropout", 0.0)),
            "init_weights": bool(config.get("init_weights", True)),
        }

    @classmethod
    def overrides_from_peft(cls, config: dict, path: str) -> dict:
        out = {}
        rank = peft_pattern_value(config.get("rank_pattern") or {}, path)
        lam = peft_pattern_value(config.get("lambda_pattern") or {}, path)
        if rank is not None:
            out["rank"] = int(rank)
        if lam is not None:
            out["delora_lambda"] = lam
        return out

    @classmethod
    def peft_config(cls, assignments: list) -> dict:
        methods = [a.method for a in assignments]
        base = max(methods, key=lambda m: sum(o == m for o in methods))
        if len({(m.dropout, m.init_weights) for m in methods}) > 1:
            raise ValueError(
                "PEFT's DeloraConfig holds one module_dropout and init_weights for all "
                "modules; this plan mixes them, so it cannot be saved in PEFT format"
            )
        return {
            "peft_type": "DELORA",
            "r": base.rank,
            "delora_lambda": base.delora_lambda,
            "module_dropout": base.dropout,
            "init_weights": base.init_weights,
            "target_modules": sorted(a.site.path for a in assignments),
            "rank_pattern": {
                a.site.path: a.method.rank for a in assignments if a.method.rank != base.rank
            },
            "lambda_pattern": {
                a.site.path: a.method.delora_lambda
                for a in assignments
                if a.method.delora_lambda != base.delora_lambda
            },
            "bias": "none",
        }
