"""LoRA: y = base(x) + s · B(A(dropout(x))), s = alpha/r (or alpha/√r with rsLoRA).

Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models" (ICLR 2022);
Kalajdzievski, "A Rank Stabilization Scaling Factor for Fine-Tuning with LoRA" (2023).
A is Kaiming-uniform and B zero, as in PEFT, so the adapter starts as the identity.
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

INITS = ("kaiming", "gaussian")


def validate_lora_fields(
    method: str, rank: object, alpha: object, dropout: object, use_rslora: object
) -> None:
    """The checks every LoRA-family method makes of LoRA's own hyperparameters."""
    if not is_int(rank) or rank <= 0:
        raise ValueError(f"{method}: rank must be a positive integer, got {rank!r}")
    if not isinstance(alpha, int | float) or isinstance(alpha, bool) or alpha <= 0:
        raise ValueError(f"{method}: alpha must be a positive number, got {alpha!r}")
    if not isinstance(dropout, int | float) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"{method}: dropout must be in [0, 1), got {dropout!r}")
    if not isinstance(use_rslora, bool):
        raise ValueError(f"{method}: use_rslora must be true or false, got {use_rslora!r}")


@register("lora")
@dataclass(frozen=True)
class LoRA:
    rank: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    use_rslora: bool = False
    init_weights: str = "kaiming"

    supported_ops: ClassVar[tuple[str, ...]] = ("linear", "addmm", "conv1d", "conv2d", "embedding")
    mergeable: ClassVar[bool] = True
    peft_type: ClassVar[str] = "LORA"

    def __post_init__(self) -> None:
        validate_lora_fields(self.name, self.rank, self.alpha, self.dropout, self.use_rslora)
        if self.init_weights not in INITS:
            raise ValueError(
                f"lora: init_weights must be one of {INITS}, got {self.init_weights!r}"
            )

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)

    def check(self, site: Site) -> str | None:
        """Why this method cannot adapt `site`, or None when it can."""
        if site.op not in self.supported_ops:
            return f"lora does not support {site.op} sites"
        fan_in = site.in_features * math.prod(site.conv.kernel if site.conv else ())
        if self.rank > min(fan_in, site.out_features):
            return (
                f"rank {self.rank} is larger than the layer allows "
                f"(min(in={fan_in}, out={site.out_features}) = "
                f"{min(fan_in, site.out_features)}); lower the rank"
            )
        if site.conv is not None and (site.conv.groups != 1 or set(site.conv.dilation) != {1}):
            return "lora supports convolutions with groups=1 and dilation=1 only"
        return None

    def params(self, site: Site) -> dict[str, ParamSpec]:
        r = self.rank
        if site.op == "embedding":
            return {
                "lora_A": ParamSpec((r, site.in_features)),
                "lora_B": ParamSpec((site.out_features, r)),
            }
        if site.conv is not None:
            ones = (1,) * len(site.conv.kernel)
            return {
                "lora_A": ParamSpec((r, site.in_features, *site.conv.kernel)),
                "lora_B": ParamSpec((site.out_features, r, *ones)),
            }
        return {
            "lora_A": ParamSpec((r, site.in_features)),
            "lora_B": ParamSpec((site.out_features, r)),
        }

    def init(
        self, site: Site, W: torch.Tensor, calib: object, generator: torch.Generator
    ) -> dict[str, torch.Tensor]:
        shapes = self.params(site)
        A = torch.empty(shapes["lora_A"].shape, dtype=torch.float32)
        B = torch.zeros(shapes["lora_B"].shape, dtype=torch.float32)
        if site.op == "embedding":  # PEFT: A zero, B normal for embeddings
            A.zero_()
            B.normal_(generator=generator)
        elif self.init_weights == "gaussian":
            A.normal_(std=1.0 / self.rank, generator=generator)
        else:
            torch.nn.init.kaiming_uniform_(A, a=math.sqrt(5), generator=generator)
        return {"lora_A": A.to(W.dtype), "lora_B": B.to(W.dtype)}

    def forward(
        self,
        x: torch.Tensor,
        base_out: torch.Tensor,
        W: torch.Tensor,
        p: dict[str, torch.Tensor],
        ctx: SiteContext,
    ) -> torch.Tensor:
        A, B, s = p["lora_A"], p["lora_B"], self.scaling
        site = ctx.site
        if site.op == "embedding":
            after_a = F.embedding(x, A.t(), padding_idx=site.padding_idx)
            return base_out + (after_a @ B.t()) * s
        h = F.dropout(x, self.dropout, ctx.training) if self.dropout > 0 else x
        if site.conv is not None:
            conv = F.conv1d if site.op == "conv1d" else F.conv2d
            g = site.conv
            return base_out + conv(conv(h, A, None, g.stride, g.padding), B) * s
        return base_out + F.linear(F.linear(h, A), B) * s

    def merged_weight(
        self, site: Site, W: torch.Tensor, p: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        """W + s·B·A in the site's logical [out, in] (or [vocab, dim] for embeddings) layout."""
        A, B, s = p["lora_A"], p["lora_B"], self.scaling
        if site.op == "embedding":
            return W + (B @ A).t() * s
        if site.conv is not None:
            if all(k == 1 for k in site.conv.kernel):
                delta = (B.flatten(1) @ A.flatten(1)).view(W.shape)
            else:
                conv = F.conv1d if site.op == "conv1d" else F.conv2d
                delta = conv(A.transpose(0, 1), B).transpose(0, 1)
            return W + delta * s
        return W + (B @ A) * s

    def cost(self, site: Site) -> Cost:
        k = 1
        for d in site.conv.kernel if site.conv else ():
            k *= d
        params = R * (D_IN * k + D_OUT)
        flops_forward = 2 * T * R * (D_IN * k + D_OUT) + 2 * T * D_OUT
        return Cost(
            params=params,
            flops_forward=flops_forward,
            flops_backward=2 * flops_forward,
            activation_bytes=T * (R + (D_IN if self.dropout > 0 else 0)) * dtype_bytes(site.dtype),
            symbols=site_symbols(site, self.rank),
        )

    # PEFT checkpoint names: adapter tensor -> key suffix after the module path.
    def peft_keys(self, site: Site) -> dict[str, str]:
        if site.op == "embedding":
            return {"lora_A": "lora_embedding_A", "lora_B": "lora_embedding_B"}
        return {"lora_A": "lora_A.weight", "lora_B": "lora_B.weight"}

    # PEFT adapter_config.json, both ways.
    @classmethod
    def claims_peft(cls, config: dict) -> bool:
        init = config.get("init_lora_weights", True)
        return (
            config.get("peft_type") == "LORA"
            and not config.get("use_dora", False)
            and (init is True or init is False or init == "gaussian")
        )

    @classmethod
    def hyperparams_from_peft(cls, config: dict) -> dict:
        return {
            "rank": int(config.get("r", 8)),
            "alpha": config.get("lora_alpha", 8),
            "dropout": float(config.get("lora_dropout", 0.0)),
            "use_rslora": bool(config.get("use_rslora", False)),
            "init_weights": "gaussian"
            if config.get("init_lora_weights") == "gaussian"
            else "kaiming",
        }

    @classmethod
    def overrides_from_peft(cls, config: dict, path: str) -> dict:
        out = {}
        rank = peft_pattern_value(config.get("rank_pattern") or {}, path)
        alpha = peft_pattern_value(config.get("alpha_pattern") or {}, path)
        if rank is not None:
            out["rank"] = int(rank)
        if alpha is not None:
            out["alpha"] = alpha
        return out

    @classmethod
    def peft_config(cls, assignments: list) -> dict:
        methods = [a.method for a in assignments]
        base = max(methods, key=lambda m: sum(o == m for o in methods))
        if len({m.use_rslora for m in methods}) > 1 or len({m.dropout for m in methods}) > 1:
            raise ValueError(
                "PEFT's LoraConfig holds one use_rslora and one dropout for all modules; "
                "this plan mixes them, so it cannot be saved in PEFT format"
            )
        return {
            "peft_type": "LORA",
            "r": base.rank,
            "lora_alpha": base.alpha,
            "lora_dropout": base.dropout,
            "use_rslora": base.use_rslora,
            "target_modules": sorted(a.site.path for a in assignments),
            "rank_pattern": {
                a.site.path: a.method.rank for a in assignments if a.method.rank != base.rank
            },
            "alpha_pattern": {
                a.site.path: a.method.alpha for a in assignments if a.method.alpha != base.alpha
            },
            "fan_in_fan_out": all(a.site.op == "addmm" for a in assignments),
            "bias": "none",
            "init_lora_weights": "gaussian" if base.init_weights == "gaussian" else True,
            "use_dora": False,
        }
