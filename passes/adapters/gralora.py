"""GraLoRA: y = base(x) + s·[x_n A_n[:, j] B_j[n]]_{n,j} (+ s·B_h A_h x), s = alpha/(r + hybrid_r).

Jung et al., "GraLoRA: Granular Low-Rank Adaptation for Parameter-Efficient Fine-Tuning"
(2025). W's update is cut into k×k blocks; input block n has its own A_n [in/k, r] and output
block j its own B_j [r, out/k]. Block (j, n) of the update is A_n's j-th slice of r/k columns
times B_j's n-th slice of r/k rows, so each block is rank r/k and the whole update can reach
rank k·r with LoRA's parameter count. Hybrid GraLoRA adds a plain LoRA of rank hybrid_r.
B starts at zero, so the adapter starts as the identity. Parity target: PEFT GraloraConfig.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import sympy
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
)
from passes.adapters.registry import register
from rewrite.sites import Site

HYBRID = sympy.Symbol("h", nonnegative=True, integer=True)


@register("gralora")
@dataclass(frozen=True)
class GraLoRA:
    rank: int = 32
    alpha: float = 64.0
    k: int = 2
    hybrid_r: int = 0
    dropout: float = 0.0
    init_weights: bool = True  # False: B random too (PEFT's testing init)

    supported_ops: ClassVar[tuple[str, ...]] = ("linear", "addmm")
    mergeable: ClassVar[bool] = True
    peft_type: ClassVar[str] = "GRALORA"

    def __post_init__(self) -> None:
        def positive_int(name: str, v: object, low: int) -> None:
            if not is_int(v) or v < low:
                raise ValueError(f"gralora: {name} must be an integer >= {low}, got {v!r}")

        positive_int("rank", self.rank, 1)
        positive_int("k", self.k, 1)
        positive_int("hybrid_r", self.hybrid_r, 0)
        if self.rank % self.k:
            raise ValueError(
                f"gralora: rank {self.rank} must be divisible by k {self.k} (each of the k×k "
                "blocks gets rank r/k); choose k among the divisors of the rank"
            )
        if (
            not isinstance(self.alpha, int | float)
            or isinstance(self.alpha, bool)
            or self.alpha <= 0
        ):
            raise ValueError(f"gralora: alpha must be a positive number, got {self.alpha!r}")
        if not isinstance(self.dropout, int | float) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"gralora: dropout must be in [0, 1), got {self.dropout!r}")
        if not isinstance(self.init_weights, bool):
            raise ValueError(
                f"gralora: init_weights must be true or false, got {self.init_weights!r}"
            )

    @property
    def scaling(self) -> float:
        return self.alpha / (self.rank + self.hybrid_r)

    def check(self, site: Site) -> str | None:
        """Why this method cannot adapt `site`, or None when it can."""
        if site.op not in self.supported_ops:
            return f"gralora supports linear and GPT-2 Conv1D (addmm) layers, not {site.op} sites"
        for what, n in (("in_features", site.in_features), ("out_features", site.out_features)):
            if n % self.k:
                return (
                    f"k {self.k} does not divide {what} {n}; gralora cuts the layer into k×k "
                    f"blocks, so pick k dividing both {site.in_features} and {site.out_features} "
                    f"(and the rank {self.rank})"
                )
        return None

    def params(self, site: Site) -> dict[str, ParamSpec]:
        k, r, h = self.k, self.rank, self.hybrid_r
        out = {
            "gralora_A": ParamSpec((k, site.in_features // k, r)),
            "gralora_B": ParamSpec((k, r, site.out_features // k)),
        }
        if h:
            out["gralora_A_general"] = ParamSpec((h, site.in_features))
            out["gralora_B_general"] = ParamSpec((site.out_features, h))
        return out

    def init(
        self, site: Site, W: torch.Tensor, calib: object, generator: torch.Generator
    ) -> dict[str, torch.Tensor]:
        # PEFT draws one [r, in/k] A (and [out/k, r] B) per block, stacks and transposes them.
        k, r = self.k, self.rank
        sub_in, sub_out = site.in_features // k, site.out_features // k
        As, Bs = [], []
        for _ in range(k):
            As.append(_kaiming(torch.empty(r, sub_in), generator))
            Bs.append(
                _kaiming(torch.empty(sub_out, r), generator)
                if not self.init_weights
                else torch.zeros(sub_out, r)
            )
        out = {
            "gralora_A": torch.stack(As).transpose(1, 2).contiguous(),
            "gralora_B": torch.stack(Bs).transpose(1, 2).contiguous(),
        }
        if self.hybrid_r:
            h = self.hybrid_r
            out["gralora_A_general"] = _kaiming(torch.empty(h, site.in_features), generator)
            B = torch.empty(site.out_features, h)
            out["gralora_B_general"] = B.zero_() if self.init_weights else _kaiming(B, generator)
        return {n: t.to(W.dtype) for n, t in out.items()}

    def forward(
        self,
        x: torch.Tensor,
        base_out: torch.Tensor,
        W: torch.Tensor,
        p: dict[str, torch.Tensor],
        ctx: SiteContext,
    ) -> torch.Tensor:
        A, B, k = p["gralora_A"], p["gralora_B"], self.k
        sr = self.rank // k
        h = F.dropout(x, self.dropout, ctx.training) if self.dropout > 0 else x
        hb = h.reshape(-1, k, A.shape[1])  # [tokens, k input blocks, in/k]
        z = torch.einsum("tni,nir->tnr", hb, A)  # each input block through its own A_n
        # output block j reads the j-th r/k slice of every input block's rank vector
        z = z.reshape(-1, k, k, sr).transpose(1, 2).reshape(-1, k, self.rank)
        y = torch.einsum("tjr,jro->tjo", z, B).reshape(base_out.shape)
        out = base_out + y * self.scaling
        if self.hybrid_r:
            # PEFT applies the dropout module a second time (a fresh mask) for the hybrid LoRA
            h2 = F.dropout(x, self.dropout, ctx.training) if self.dropout > 0 else x
            lora = F.linear(F.linear(h2, p["gralora_A_general"]), p["gralora_B_general"])
            out = out + lora * self.scaling
        return out

    def merged_weight(
        self, site: Site, W: torch.Tensor, p: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        """W + s·ΔW in the site's [out, in] layout."""
        return W + self.delta(p) * self.scaling

    def delta(self, p: dict[str, torch.Tensor]) -> torch.Tensor:
        """The unscaled update [out, in]: block (j, n) = (A_n[:, j-th r/k] · B_j[n-th r/k])ᵀ."""
        A, B, k = p["gralora_A"], p["gralora_B"], self.k
        sr = self.rank // k
        sub_in, sub_out = A.shape[1], B.shape[2]
        A4 = A.reshape(k, sub_in, k, sr)  # [n, i, j, s]
        B4 = B.reshape(k, k, sr, sub_out)  # [j, n, s, o]
        delta_t = torch.einsum("nijs,jnso->nijo", A4, B4).reshape(k * sub_in, k * sub_out)
        delta = delta_t.t()
        if self.hybrid_r:
            delta = delta + p["gralora_B_general"] @ p["gralora_A_general"]
        return delta

    def cost(self, site: Site) -> Cost:
        params = (R + HYBRID) * (D_IN + D_OUT)
        flops_forward = 2 * T * (R + HYBRID) * (D_IN + D_OUT) + 2 * T * D_OUT
        return Cost(
            params=params,
            flops_forward=flops_forward,
            flops_backward=2 * flops_forward,
            activation_bytes=T
            * (R + HYBRID + (D_IN if self.dropout > 0 else 0))
            * dtype_bytes(site.dtype),
            symbols={
                D_IN: site.in_features,
                D_OUT: site.out_features,
                R: self.rank,
                HYBRID: self.hybrid_r,
            },
        )

    def peft_keys(self, site: Site) -> dict[str, str]:
        keys = {"gralora_A": "gralora_A", "gralora_B": "gralora_B"}
        if self.hybrid_r:
            keys["gralora_A_general"] = "gralora_A_general.weight"
            keys["gralora_B_general"] = "gralora_B_general.weight"
        return keys

    @classmethod
    def claims_peft(cls, config: dict) -> bool:
        return config.get("peft_type") == "GRALORA"

    @classmethod
    def hyperparams_from_peft(cls, config: dict) -> dict:
        return {
            "rank": int(config.get("r", 32)),
            "alpha": config.get("alpha", 64),
            "k": int(config.get("gralora_k", 2)),
            "hybrid_r": int(config.get("hybrid_r", 0)),
            "dropout": float(config.get("gralora_dropout", 0.0)),
            "init_weights": bool(config.get("init_weights", True)),
        }

    @classmethod
    def overrides_from_peft(cls, config: dict, path: str) -> dict:
        return {}  # GraloraConfig has no per-module patterns

    @classmethod
    def peft_config(cls, assignments: list) -> dict:
        methods = {a.method for a in assignments}
        if len(methods) > 1:
            raise ValueError(
                "PEFT's GraloraConfig holds one set of hyperparameters for all modules; this "
                "plan gives modules different ones, so it cannot be saved in PEFT format"
            )
        m = methods.pop()
        return {
            "peft_type": "GRALORA",
            "r": m.rank,
            "alpha": m.alpha,
            "gralora_k": m.k,
            "hybrid_r": m.hybrid_r,
            "gralora_dropout": m.dropout,
            "init_weights": m.init_weights,
            "fan_in_fan_out": all(a.site.op == "addmm" for a in assignments),
            "target_modules": sorted(a.site.path for a in assignments),
            "bias": "none",
        }


def _kaiming(t: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    torch.nn.init.kaiming_uniform_(t, a=math.sqrt(5), generator=generator)
    return t
