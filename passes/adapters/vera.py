"""VeRA: y = base(x) + b ⊙ (B_s (d ⊙ (A_s dropout(x)))), with A, B frozen and random.

Kopiczko et al., "VeRA: Vector-based Random Matrix Adaptation" (ICLR 2024).
One Kaiming-uniform pair A [r, max_in], B [max_out, r] (seeded by `projection_prng_key`, as
PEFT's VeraModel does) is shared by every adapted layer; each layer slices A_s = A[:, :in],
B_s = B[:out, :] and trains only the vectors d [r] (init d_initial) and b [out] (init 0, so
the adapter starts as the identity).
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache
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
    require_uniform,
    site_symbols,
)
from passes.adapters.registry import register
from rewrite.sites import Site
from rewrite.spec import SpecError


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
@dataclass(frozen=True)
class VeRA:
    rank: int = 256
    d_initial: float = 0.1
    dropout: float = 0.0
    projection_prng_key: int = 0
    save_projection: bool = True
    init_weights: bool = True
    # Size of the shared A/B: the largest in/out over all sites (set by bind_plan, as PEFT's
    # _find_dim does); a larger value may be given, a smaller one is refused by check().
    max_in_features: int | None = field(default=None, repr=False)
    max_out_features: int | None = field(default=None, repr=False)

    supported_ops: ClassVar[tuple[str, ...]] = ("linear", "addmm")
    mergeable: ClassVar[bool] = True
    peft_type: ClassVar[str] = "VERA"

    def __post_init__(self) -> None:
        if not is_int(self.rank) or self.rank <= 0:
            raise ValueError(f"vera: rank must be a positive integer, got {self.rank!r}")
        if not isinstance(self.d_initial, int | float) or not math.isfinite(self.d_initial):
            raise ValueError(f"vera: d_initial must be a finite number, got {self.d_initial!r}")
        if not isinstance(self.dropout, int | float) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"vera: dropout must be in [0, 1), got {self.dropout!r}")
        if not is_int(self.projection_prng_key) or self.projection_prng_key < 0:
            raise ValueError(
                "vera: projection_prng_key must be a non-negative integer, "
                f"got {self.projection_prng_key!r}"
            )
        for name in ("save_projection", "init_weights"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"vera: {name} must be true or false, got {getattr(self, name)!r}")
        for name in ("max_in_features", "max_out_features"):
            value = getattr(self, name)
            if value is not None and (not is_int(value) or value <= 0):
                raise ValueError(f"vera: {name} must be a positive integer or null, got {value!r}")

    @property
    def save_frozen(self) -> bool:
        """PEFT's save_projection: the shared A/B go into the checkpoint too."""
        return self.save_projection

    def check(self, site: Site) -> str | None:
        if site.op not in self.supported_ops:
            return f"vera supports linear layers (nn.Linear, GPT-2 Conv1D), not {site.op} sites"
        if self.max_in_features is not None and site.in_features > self.max_in_features:
            return f"in_features {site.in_features} exceed max_in_features {self.max_in_features}"
        if self.max_out_features is not None and site.out_features > self.max_out_features:
            return (
                f"out_features {site.out_features} exceed max_out_features {self.max_out_features}"
            )
        return None

    def _shared_dims(self, site: Site) -> tuple[int, int]:
        # unbound (a one-site plan): the site's own dims
        return (
            max(site.in_features, self.max_in_features or 0),
            max(site.out_features, self.max_out_features or 0),
        )

    def params(self, site: Site) -> dict[str, ParamSpec]:
        n_in, n_out = self._shared_dims(site)
        return {
            "vera_lambda_d": ParamSpec((self.rank,)),
            "vera_lambda_b": ParamSpec((site.out_features,)),
            "vera_A": ParamSpec((self.rank, n_in), trainable=False, shared=True),
            "vera_B": ParamSpec((n_out, self.rank), trainable=False, shared=True),
        }

    @classmethod
    def bind_plan(cls, assignments: list) -> list:
        """Size the shared pair by all VeRA sites; they must agree on what the pair is."""
        for attr in ("rank", "projection_prng_key", "save_projection"):
            values = {getattr(a.method, attr) for a in assignments}
            if len(values) > 1:
                raise SpecError(
                    f"vera: all sites share one random A/B pair, so {attr} must be the same at "
                    f"every vera site; this plan has {sorted(values)}"
                )
        n_in = max(max(a.site.in_features, a.method.max_in_features or 0) for a in assignments)
        n_out = max(max(a.site.out_features, a.method.max_out_features or 0) for a in assignments)
        return [
            dataclasses.replace(
                a,
                method=dataclasses.replace(a.method, max_in_features=n_in, max_out_features=n_out),
            )
            for a in assignments
        ]

    def init(
        self, site: Site, W: torch.Tensor, calib: object, generator: torch.Generator
    ) -> dict[str, torch.Tensor]:
        n_in, n_out = self._shared_dims(site)
        A, B = _projections(self.projection_prng_key, self.rank, n_in, n_out)
        if self.init_weights:
            d = torch.full((self.rank,), float(self.d_initial))
            b = torch.zeros(site.out_features)
        else:  # PEFT: d ~ N(0, 1), b = 1
            d = torch.randn(self.rank, generator=generator)
            b = torch.ones(site.out_features)
        return {
            "vera_lambda_d": d.to(W.dtype),
            "vera_lambda_b": b.to(W.dtype),
            "vera_A": A.to(W.dtype),
            "vera_B": B.to(W.dtype),
        }

    def forward(
        self,
        x: torch.Tensor,
        base_out: torch.Tensor,
        W: torch.Tensor,
        p: dict[str, torch.Tensor],
        ctx: SiteContext,
    ) -> torch.Tensor:
        site = ctx.site
        A = p["vera_A"][:, : site.in_features]
        B = p["vera_B"][: site.out_features, :]
        h = F.dropout(x, self.dropout, ctx.training) if self.dropout > 0 else x
        return base_out + p["vera_lambda_b"] * F.linear(p["vera_lambda_d"] * F.linear(h, A), B)

    def merged_weight(
        self, site: Site, W: torch.Tensor, p: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        """W + diag(b) B_s diag(d) A_s, as PEFT's get_delta_weight."""
        A = p["vera_A"][:, : site.in_features]
        B = p["vera_B"][: site.out_features, :]
        return W + (p["vera_lambda_b"].unsqueeze(-1) * B) @ (p["vera_lambda_d"].unsqueeze(-1) * A)

    def cost(self, site: Site) -> Cost:
        # A and B are frozen and shared: only d and b train.
        flops_forward = 2 * T * R * (D_IN + D_OUT) + T * R + 2 * T * D_OUT
        return Cost(
            params=R + D_OUT,
            flops_forward=flops_forward,
            flops_backward=2 * flops_forward,
            activation_bytes=T
            * (2 * R + (D_IN if self.dropout > 0 else 0))
            * dtype_bytes(site.dtype),
            symbols=site_symbols(site, self.rank),
        )

    def peft_keys(self, site: Site) -> dict[str, str]:
        return {
            "vera_lambda_d": "vera_lambda_d",
            "vera_lambda_b": "vera_lambda_b",
            "vera_A": "base_model.vera_A",
            "vera_B": "base_model.vera_B",
        }

    @classmethod
    def claims_peft(cls, config: dict) -> bool:
        return config.get("peft_type") == "VERA"

    @classmethod
    def hyperparams_from_peft(cls, config: dict) -> dict:
        key = config.get("projection_prng_key", 0)
        return {
            "rank": int(config.get("r", 256)),
            "d_initial": config.get("d_initial", 0.1),
            "dropout": float(config.get("vera_dropout", 0.0)),
            "projection_prng_key": int(key) if is_int(key) else key,
            "save_projection": bool(config.get("save_projection", True)),
            "init_weights": bool(config.get("init_weights", True)),
        }

    @classmethod
    def overrides_from_peft(cls, config: dict, path: str) -> dict:
        return {}  # VeraConfig has no per-module patterns

    @classmethod
    def peft_config(cls, assignments: list) -> dict:
        methods = [a.method for a in assignments]
        require_uniform(
            methods,
            ("rank", "dropout", "projection_prng_key", "save_projection", "init_weights"),
            "VeraConfig",
        )
        base = methods[0]
        d_initial = Counter(m.d_initial for m in methods).most_common(1)[0][0]
        return {
            "peft_type": "VERA",
            "r": base.rank,
            "d_initial": d_initial,
            "vera_dropout": base.dropout,
            "projection_prng_key": base.projection_prng_key,
            "save_projection": base.save_projection,
            "init_weights": base.init_weights,
            "target_modules": sorted(a.site.path for a in assignments),
            "fan_in_fan_out": all(a.site.op == "addmm" for a in assignments),
            "bias": "none",
        }
