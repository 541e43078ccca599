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
from typing import ClassVar

import sympy
import torch
import torch.nn.functional as F

from passes.adapters.base import Params, ParamSpec, SiteContext, Tensor
from passes.adapters.contract import FLAG, POSITIVE_NUMBER, PROBABILITY, Method, hp, int_at_least
from passes.adapters.cost import D_IN, D_OUT, Cost, R, T, dtype_bytes
from passes.adapters.peft_record import PeftField, PeftFormat
from passes.adapters.registry import register
from rewrite.sites import Site

HYBRID = sympy.Symbol("h", nonnegative=True, integer=True)


@register("gralora")
class GraLoRA(Method):
    rank: int = hp(32, int_at_least(1))
    alpha: float = hp(64.0, POSITIVE_NUMBER)
    k: int = hp(2, int_at_least(1))
    hybrid_r: int = hp(0, int_at_least(0))
    dropout: float = hp(0.0, PROBABILITY)
    init_weights: bool = hp(True, FLAG)  # False: B random too (PEFT's testing init)

    supported_ops: ClassVar[tuple[str, ...]] = ("linear", "addmm")
    peft = PeftFormat(
        peft_type="GRALORA",
        config="GraloraConfig",
        fields={
            "rank": PeftField("r", 32, read=int),
            "alpha": PeftField("alpha", 64),
            "k": PeftField("gralora_k", 2, read=int),
            "hybrid_r": PeftField("hybrid_r", 0, read=int),
            "dropout": PeftField("gralora_dropout", 0.0, read=float),
            "init_weights": PeftField("init_weights", True, read=bool),
        },
        keys={  # the hybrid LoRA's only where hybrid_r > 0 (params has them)
            "gralora_A": "gralora_A",
            "gralora_B": "gralora_B",
            "gralora_A_general": "gralora_A_general.weight",
            "gralora_B_general": "gralora_B_general.weight",
        },
        fan_in_fan_out=True,
    )

    def validate(self) -> None:
        if self.rank % self.k:
            raise ValueError(
                f"gralora: rank {self.rank} must be divisible by k {self.k} (each of the k×k "
                "blocks gets rank r/k); choose k among the divisors of the rank"
            )

    @property
    def scaling(self) -> float:
        return self.alpha / (self.rank + self.hybrid_r)

    def check_site(self, site: Site) -> str | None:
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

    def init(self, site: Site, W: Tensor, calib: object, generator: torch.Generator) -> Params:
        # PEFT draws one [r, in/k] A (and [out/k, r] B) per block, stacks and transposes them.
        k, r = self.k, self.rank
        sub_in, sub_out = site.in_features // k, site.out_features // k
        As, Bs = [], []
        for _ in range(k):
            As.append(_kaiming(torch.empty(r, sub_in), generator))
            B = torch.zeros(sub_out, r)
            Bs.append(B if self.init_weights else _kaiming(B, generator))
        out = {
            "gralora_A": torch.stack(As).transpose(1, 2).contiguous(),
            "gralora_B": torch.stack(Bs).transpose(1, 2).contiguous(),
        }
        if h := self.hybrid_r:
            out["gralora_A_general"] = _kaiming(torch.empty(h, site.in_features), generator)
            B = torch.empty(site.out_features, h)
            out["gralora_B_general"] = B.zero_() if self.init_weights else _kaiming(B, generator)
        return {n: t.to(W.dtype) for n, t in out.items()}

    def forward(
        self, x: Tensor, base_out: Tensor, W: Tensor, p: Params, ctx: SiteContext
    ) -> Tensor:
        A, B, k, sr = p["gralora_A"], p["gralora_B"], self.k, self.rank // self.k
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

    def merged_weight(self, site: Site, W: Tensor, p: Params) -> Tensor:
        """W + s·ΔW in the site's [out, in] layout."""
        return W + self.delta(p) * self.scaling

    def delta(self, p: dict[str, torch.Tensor]) -> torch.Tensor:
        """The unscaled update [out, in]: block (j, n) = (A_n[:, j-th r/k] · B_j[n-th r/k])ᵀ."""
        A, B, k, sr = p["gralora_A"], p["gralora_B"], self.k, self.rank // self.k
        sub_in, sub_out = A.shape[1], B.shape[2]
        A4 = A.reshape(k, sub_in, k, sr)  # [n, i, j, s]
        B4 = B.reshape(k, k, sr, sub_out)  # [j, n, s, o]
        delta = torch.einsum("nijs,jnso->nijo", A4, B4).reshape(k * sub_in, k * sub_out).t()
        if self.hybrid_r:
            delta = delta + p["gralora_B_general"] @ p["gralora_A_general"]
        return delta

    def cost(self, site: Site) -> Cost:
        params = (R + HYBRID) * (D_IN + D_OUT)
        flops_forward = 2 * T * (R + HYBRID) * (D_IN + D_OUT) + 2 * T * D_OUT
        saved = R + HYBRID + (D_IN if self.dropout > 0 else 0)
        symbols = {D_IN: site.in_features, D_OUT: site.out_features, R: self.rank}
        return Cost(
            params=params,
            flops_forward=flops_forward,
            flops_backward=2 * flops_forward,
            activation_bytes=T * saved * dtype_bytes(site.dtype),
            symbols={**symbols, HYBRID: self.hybrid_r},
        )


def _kaiming(t: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    torch.nn.init.kaiming_uniform_(t, a=math.sqrt(5), generator=generator)
    return t
