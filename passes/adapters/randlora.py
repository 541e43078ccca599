"""RandLoRA: y = base(x) + s · Σ_n B_n diag(λ_n) A diag(γ_n) x, full rank from random bases.

Albert et al., "RandLoRA: Full-rank parameter-efficient fine-tuning of large models" (ICLR 2025).
Frozen random bases A [r, 1, min_dim] and B [max_dim, n_bases, r] (seeded by
`projection_prng_key`, as PEFT's RandLoraModel does) are shared by every adapted layer and
sliced per layer; n = ceil(min(in, out) / r) bases make the update full rank. Each layer trains
λ [r, n] (init 0, so the adapter starts as the identity) and γ [n, min(in, out)]; s = alpha/r.
The flattening order of the bases follows PEFT exactly, so PEFT checkpoints load unchanged.
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache
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
    require_uniform,
    site_symbols,
)
from passes.adapters.registry import register
from rewrite.sites import Site
from rewrite.spec import SpecError


def _n_bases(min_dim: int, rank: int) -> int:
    return -(-min_dim // rank)  # ceil: enough bases for a full-rank update


def _kaiming(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    # PEFT draws the dense bases in bfloat16 (fp16 only where bf16 is unavailable, which no
    # CPU is); they are cast to the layer's dtype afterwards.
    tensor = torch.empty(shape, dtype=torch.bfloat16)
    return torch.nn.init.kaiming_uniform_(tensor, a=math.sqrt(5), generator=generator)


@lru_cache(maxsize=4)
def _bases(
    key: int, rank: int, n_out: int, n_in: int, sparse: bool, very_sparse: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's _init_randlora_A_randlora_B(_sparse): A [r, 1, min], B [max, n_bases, r]."""
    max_dim, min_dim = max(n_out, n_in), min(n_out, n_in)
    n = _n_bases(min_dim, rank)
    generator = torch.Generator(device="cpu").manual_seed(key)
    if sparse or very_sparse:
        sparsity = math.sqrt(min_dim) if very_sparse else 3
        A = torch.rand((rank, 1, min_dim), generator=generator)
        B = torch.rand((max_dim, n, rank), generator=generator)
        out = []
        for dense in (A, B):
            ternary = torch.zeros(dense.shape)
            ternary[dense < 1 / (2 * sparsity)] = -1
            ternary[dense > 1 - 1 / (2 * sparsity)] = 1
            out.append(ternary / ternary.std())
        return out[0], out[1]
    A = _kaiming((rank, 1, min_dim), generator)
    B = torch.cat([_kaiming((max_dim, 1, rank), generator) for _ in range(n)], dim=1)
    return A / A.std(), B / B.std()


@register("randlora")
@dataclass(frozen=True)
class RandLoRA:
    rank: int = 32
    alpha: float = 640.0
    dropout: float = 0.0
    projection_prng_key: int = 0
    save_projection: bool = True
    sparse: bool = False
    very_sparse: bool = False
    init_weights: bool = True
    # Size of the shared bases: the largest in/out over all sites (set by bind_plan, as PEFT's
    # _find_dim does); a larger value may be given, a smaller one is refused by check().
    max_in_features: int | None = field(default=None, repr=False)
    max_out_features: int | None = field(default=None, repr=False)

    supported_ops: ClassVar[tuple[str, ...]] = ("linear", "addmm")
    mergeable: ClassVar[bool] = True
    peft_type: ClassVar[str] = "RANDLORA"

    def __post_init__(self) -> None:
        if not is_int(self.rank) or self.rank <= 0:
            raise ValueError(f"randlora: rank must be a positive integer, got {self.rank!r}")
        if (
            not isinstance(self.alpha, int | float)
            or not math.isfinite(self.alpha)
            or self.alpha <= 0
        ):
            raise ValueError(f"randlora: alpha must be a positive number, got {self.alpha!r}")
        if not isinstance(self.dropout, int | float) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"randlora: dropout must be in [0, 1), got {self.dropout!r}")
        if not is_int(self.projection_prng_key) or self.projection_prng_key < 0:
            raise ValueError(
                "randlora: projection_prng_key must be a non-negative integer, "
                f"got {self.projection_prng_key!r}"
            )
        for name in ("save_projection", "sparse", "very_sparse", "init_weights"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(
                    f"randlora: {name} must be true or false, got {getattr(self, name)!r}"
                )
        for name in ("max_in_features", "max_out_features"):
            value = getattr(self, name)
            if value is not None and (not is_int(value) or value <= 0):
                raise ValueError(
                    f"randlora: {name} must be a positive integer or null, got {value!r}"
                )

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    @property
    def save_frozen(self) -> bool:
        """PEFT's save_projection: the shared bases go into the checkpoint too."""
        return self.save_projection

    def check(self, site: Site) -> str | None:
        if site.op not in self.supported_ops:
            return f"randlora supports linear layers (nn.Linear, GPT-2 Conv1D), not {site.op} sites"
        if self.max_in_features is not None and site.in_features > self.max_in_features:
            return f"in_features {site.in_features} exceed max_in_features {self.max_in_features}"
        if self.max_out_features is not None and site.out_features > self.max_out_features:
            return (
                f"out_features {site.out_features} exceed max_out_features {self.max_out_features}"
            )
        return None

    def _shared_dims(self, site: Site) -> tuple[int, int]:
        # (out, in) of the shared bases; unbound (a one-site plan): the site's own dims
        return (
            max(site.out_features, self.max_out_features or 0),
            max(site.in_features, self.max_in_features or 0),
        )

    def params(self, site: Site) -> dict[str, ParamSpec]:
        r = self.rank
        min_dim = min(site.in_features, site.out_features)
        n = _n_bases(min_dim, r)
        n_out, n_in = self._shared_dims(site)
        shared_min = min(n_out, n_in)
        return {
            "randlora_lambda": ParamSpec((r, n)),
            "randlora_gamma": ParamSpec((n, min_dim)),
            "randlora_A": ParamSpec((r, 1, shared_min), trainable=False, shared=True),
            "randlora_B": ParamSpec(
                (max(n_out, n_in), _n_bases(shared_min, r), r), trainable=False, shared=True
            ),
        }

    @classmethod
    def bind_plan(cls, assignments: list) -> list:
        """Size the shared bases by all RandLoRA sites; they must agree on what the bases are."""
        for attr in ("rank", "projection_prng_key", "save_projection", "sparse", "very_sparse"):
            values = {getattr(a.method, attr) for a in assignments}
            if len(values) > 1:
                raise SpecError(
                    f"randlora: all sites share one pair of random bases, so {attr} must be the "
                    f"same at every randlora site; this plan has {sorted(values)}"
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
        shapes = self.params(site)
        n_out, n_in = self._shared_dims(site)
        A, B = _bases(
            self.projection_prng_key, self.rank, n_out, n_in, self.sparse, self.very_sparse
        )
        lam_shape, gamma_shape = shapes["randlora_lambda"].shape, shapes["randlora_gamma"].shape
        if self.init_weights:  # PEFT's reset_randlora_parameters
            lam = torch.zeros(lam_shape)
            gamma = torch.full(gamma_shape, 1.0 / max(gamma_shape))
        else:
            lam = torch.randn(lam_shape, generator=generator)
            gamma = torch.full(gamma_shape, 1.0 / max(site.in_features, site.out_features))
        return {
            "randlora_lambda": lam.to(W.dtype),
            "randlora_gamma": gamma.to(W.dtype),
            "randlora_A": A.to(W.dtype),
            "randlora_B": B.to(W.dtype),
        }

    def _factors(self, site: Site, p: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(first [k, in], second [out, k]) with ΔW = s · second @ first (PEFT's get_scaled_bases)."""
        min_dim = min(site.in_features, site.out_features)
        max_dim = max(site.in_features, site.out_features)
        n = _n_bases(min_dim, self.rank)
        A = p["randlora_A"][:, :n, :min_dim]
        B = p["randlora_B"][:max_dim, :n, :]
        lam, gamma = p["randlora_lambda"], p["randlora_gamma"]
        scaled = (lam[:, :, None] * A * gamma[None]).flatten(0, 1)  # [r·n, min]
        flat_b = B.flatten(1)  # [max, n·r]
        # The trained factor sits on the smaller side of the layer.
        if min_dim == site.in_features:
            return scaled, flat_b
        return flat_b.t(), scaled.t()

    def forward(
        self,
        x: torch.Tensor,
        base_out: torch.Tensor,
        W: torch.Tensor,
        p: dict[str, torch.Tensor],
        ctx: SiteContext,
    ) -> torch.Tensor:
        first, second = self._factors(ctx.site, p)
        h = F.dropout(x, self.dropout, ctx.training) if self.dropout > 0 else x
        if x.dtype in (torch.float16, torch.bfloat16):
            # The update sums n·r scaled random bases; in half precision that drifts ~10%.
            # Like PEFT on CPU: bases and input in fp32, the sum cast back once.
            first, second, h = first.float(), second.float(), h.float()
            update = F.linear(F.linear(h, first), second) * self.scaling
            return (base_out.float() + update).to(base_out.dtype)
        return base_out + F.linear(F.linear(h, first), second) * self.scaling

    def merged_weight(
        self, site: Site, W: torch.Tensor, p: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        first, second = self._factors(site, p)
        return W + (second @ first) * self.scaling

    def cost(self, site: Site) -> Cost:
        # Shared bases are frozen: λ [r, n] and γ [n, min] train, n = ceil(min / r).
        min_dim = sympy.Min(D_IN, D_OUT)
        n = sympy.ceiling(min_dim / R)
        build = 2 * R * n * min_dim  # λ and γ scale the bases
        flops_forward = build + 2 * T * R * n * (D_IN + D_OUT) + 2 * T * D_OUT
        return Cost(
            params=R * n + n * min_dim,
            flops_forward=flops_forward,
            flops_backward=2 * flops_forward,
            activation_bytes=(T * (R * n + (D_IN if self.dropout > 0 else 0)) + R * n * min_dim)
            * dtype_bytes(site.dtype),
            symbols=site_symbols(site, self.rank),
        )

    def peft_keys(self, site: Site) -> dict[str, str]:
        return {
            "randlora_lambda": "randlora_lambda",
            "randlora_gamma": "randlora_gamma",
            "randlora_A": "base_model.randlora_A",
            "randlora_B": "base_model.randlora_B",
        }

    def peft_aliases(self, site: Site) -> dict[str, list[str]]:
        """PEFT's checkpoints repeat the shared bases under every layer's path."""
        return {"randlora_A": ["randlora_A"], "randlora_B": ["randlora_B"]}

    @classmethod
    def claims_peft(cls, config: dict) -> bool:
        return config.get("peft_type") == "RANDLORA"

    @classmethod
    def hyperparams_from_peft(cls, config: dict) -> dict:
        key = config.get("projection_prng_key", 0)
        return {
            "rank": int(config.get("r", 32)),
            "alpha": config.get("randlora_alpha", 640),
            "dropout": float(config.get("randlora_dropout", 0.0)),
            "projection_prng_key": int(key) if is_int(key) else key,
            "save_projection": bool(config.get("save_projection", True)),
            "sparse": bool(config.get("sparse", False)),
            "very_sparse": bool(config.get("very_sparse", False)),
            "init_weights": bool(config.get("init_weights", True)),
        }

    @classmethod
    def overrides_from_peft(cls, config: dict, path: str) -> dict:
        return {}  # RandLoraConfig has no per-module patterns

    @classmethod
    def peft_config(cls, assignments: list) -> dict:
        methods = [a.method for a in assignments]
        require_uniform(
            methods,
            ("rank", "alpha", "dropout", "projection_prng_key", "save_projection"),
            "RandLoraConfig",
        )
        base = methods[0]
        init = Counter(m.init_weights for m in methods).most_common(1)[0][0]
        return {
            "peft_type": "RANDLORA",
            "r": base.rank,
            "randlora_alpha": base.alpha,
            "randlora_dropout": base.dropout,
            "projection_prng_key": base.projection_prng_key,
            "save_projection": base.save_projection,
            "sparse": base.sparse,
            "very_sparse": base.very_sparse,
            "init_weights": init,
            "target_modules": sorted(a.site.path for a in assignments),
            "fan_in_fan_out": all(a.site.op == "addmm" for a in assignments),
            "bias": "none",
        }
