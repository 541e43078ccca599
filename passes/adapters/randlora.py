"""RandLoRA: y = base(x) + s · Σ_n B_n diag(λ_n) A diag(γ_n) x, full rank from random bases.

Albert et al., "RandLoRA: Full-rank parameter-efficient fine-tuning of large models" (ICLR 2025).
Frozen random bases A [r, 1, min_dim] and B [max_dim, n_bases, r] (seeded by
`projection_prng_key`, as PEFT's RandLoraModel does) are shared by every adapted layer and
sliced per layer; n = ceil(min(in, out) / r) bases make the update full rank. Each layer trains
λ [r, n] (init 0, so the adapter starts as the identity) and γ [n, min(in, out)]; s = alpha/r.
The flattening order of the bases follows PEFT exactly, so PEFT checkpoints load unchanged.
"""

from __future__ import annotations

import math
from functools import lru_cache

import sympy
import torch
import torch.nn.functional as F

from passes.adapters.base import Params, ParamSpec, SiteContext, Tensor
from passes.adapters.contract import FLAG, POSITIVE_FINITE, POSITIVE_INT, Rule, hp
from passes.adapters.cost import D_IN, D_OUT, Cost, R, T, dtype_bytes, site_symbols
from passes.adapters.peft_record import PeftField
from passes.adapters.registry import register
from passes.adapters.shared_projection import SharedProjection, projection_format
from rewrite.sites import Site

POSITIVE_ALPHA = Rule("a positive number", POSITIVE_FINITE.ok)  # and finite


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
class RandLoRA(SharedProjection):
    rank: int = hp(32, POSITIVE_INT)
    alpha: float = hp(640.0, POSITIVE_ALPHA)
    sparse: bool = hp(False, FLAG)
    very_sparse: bool = hp(False, FLAG)

    shared_by_all = (*SharedProjection.shared_by_all, "sparse", "very_sparse")
    shared_what = "one pair of random bases"
    peft = projection_format(
        "RANDLORA",
        "RandLoraConfig",
        "randlora",
        32,
        trained=("randlora_lambda", "randlora_gamma"),
        fields={
            "alpha": PeftField("randlora_alpha", 640),
            "sparse": PeftField("sparse", False, read=bool),
            "very_sparse": PeftField("very_sparse", False, read=bool),
            "init_weights": PeftField("init_weights", True, read=bool, init_only=True),
        },
        # PEFT's checkpoints repeat the shared bases under every layer's path.
        aliases={"randlora_A": ("randlora_A",), "randlora_B": ("randlora_B",)},
    )

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def params(self, site: Site) -> dict[str, ParamSpec]:
        r, min_dim = self.rank, min(site.in_features, site.out_features)
        n = _n_bases(min_dim, r)
        n_in, n_out = self._shared_dims(site)
        shared_min = min(n_out, n_in)
        return {
            "randlora_lambda": ParamSpec((r, n)),
            "randlora_gamma": ParamSpec((n, min_dim)),
            "randlora_A": ParamSpec((r, 1, shared_min), trainable=False, shared=True),
            "randlora_B": ParamSpec(
                (max(n_out, n_in), _n_bases(shared_min, r), r), trainable=False, shared=True
            ),
        }

    def init(self, site: Site, W: Tensor, calib: object, generator: torch.Generator) -> Params:
        shapes = self.params(site)
        n_in, n_out = self._shared_dims(site)
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
        values = {"randlora_lambda": lam, "randlora_gamma": gamma, "randlora_A": A, "randlora_B": B}
        return {name: v.to(W.dtype) for name, v in values.items()}

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
        self, x: Tensor, base_out: Tensor, W: Tensor, p: Params, ctx: SiteContext
    ) -> Tensor:
        first, second = self._factors(ctx.site, p)
        h = F.dropout(x, self.dropout, ctx.training) if self.dropout > 0 else x
        if x.dtype in (torch.float16, torch.bfloat16):
            # The update sums n·r scaled random bases; in half precision that drifts ~10%.
            # Like PEFT on CPU: bases and input in fp32, the sum cast back once.
            first, second, h = first.float(), second.float(), h.float()
            update = F.linear(F.linear(h, first), second) * self.scaling
            return (base_out.float() + update).to(base_out.dtype)
        return base_out + F.linear(F.linear(h, first), second) * self.scaling

    def merged_weight(self, site: Site, W: Tensor, p: Params) -> Tensor:
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
