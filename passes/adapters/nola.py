"""NOLA: y = base(x) + s·B·A·x, A and B linear combinations of frozen random bases.

Koohpayegani et al., "NOLA: Compressing LoRA using Linear Combination of Random Basis"
(ICLR 2024; UCDvision/NOLA). A = A₀ + Σᵢ αᵢ·Âᵢ/√k and B = Σⱼ βⱼ·B̂ⱼ/√k, k = num_basis bases
for each of A (r×in) and B (out×r); only α and β train (2·k values), both zeros, so B = 0 and
the model starts as the identity. A₀ is frozen Kaiming-uniform (a = √5, LoRA's lora_A init),
the bases Â, B̂ frozen uniform(−1, 1). s = alpha/rank (alpha = rank by default). Merged:
W + s·B·A.

Seeds (the reference's choice, made here): the official code draws the bases on the device of
the coefficients, so CPU and CUDA bases differ. peftc draws A₀, then Â, then B̂ on CPU from one
generator seeded by the hyperparameter `basis_seed` (default 0) and the site path (the first
8 bytes of sha256("<basis_seed>:<path>")), not from the compile seed. The frozen tensors are
not saved: adapter_config.json carries basis_seed, and loading regenerates the same bases on
any device, so a checkpoint holds α and β only.
"""

from __future__ import annotations

import hashlib
import math
from typing import ClassVar

import sympy
import torch
import torch.nn.functional as F

from passes.adapters.base import Params, ParamSpec, SiteContext, Tensor
from passes.adapters.contract import (
    NON_NEGATIVE_INT,
    POSITIVE_INT,
    POSITIVE_NUMBER,
    Method,
    alpha_over_rank,
    hp,
    optional,
    rank_too_large,
)
from passes.adapters.cost import D_IN, D_OUT, Cost, R, T, dtype_bytes, site_symbols
from passes.adapters.registry import register
from rewrite.sites import Site

NUM_BASIS = sympy.Symbol("num_basis", positive=True, integer=True)


def site_seed(basis_seed: int, path: str) -> int:
    """The per-site seed: sha256 of "<basis_seed>:<path>", first 8 bytes, as a 63-bit int."""
    digest = hashlib.sha256(f"{basis_seed}:{path}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def bases(
    basis_seed: int, path: str, k: int, r: int, n_in: int, n_out: int
) -> tuple[Tensor, Tensor, Tensor]:
    """(A₀ [r, in], Â [k, r, in], B̂ [k, out, r]) in fp32, drawn in that order on CPU."""
    g = torch.Generator(device="cpu").manual_seed(site_seed(basis_seed, path))
    A0 = torch.nn.init.kaiming_uniform_(torch.empty(r, n_in), a=math.sqrt(5), generator=g)
    basis_A = torch.empty(k, r, n_in).uniform_(-1.0, 1.0, generator=g)
    basis_B = torch.empty(k, n_out, r).uniform_(-1.0, 1.0, generator=g)
    return A0, basis_A, basis_B


@register("nola")
class NOLA(Method):
    rank: int = hp(8, POSITIVE_INT)
    alpha: float | None = hp(None, optional(POSITIVE_NUMBER, "alpha = rank, so s = 1"))
    num_basis: int = hp(128, POSITIVE_INT, "the number of random bases, for A and for B each")
    basis_seed: int = hp(0, NON_NEGATIVE_INT, "seeds the bases, with the site path")

    supported_ops: ClassVar[tuple[str, ...]] = ("linear", "addmm")

    @property
    def scaling(self) -> float:
        return alpha_over_rank(self.alpha, self.rank)

    def check_site(self, site: Site) -> str | None:
        return rank_too_large(self.rank, site.in_features, site.out_features)

    def params(self, site: Site) -> dict[str, ParamSpec]:
        k, r = self.num_basis, self.rank
        return {
            "nola_alpha": ParamSpec((k,)),
            "nola_beta": ParamSpec((k,)),
            "nola_A0": ParamSpec((r, site.in_features), trainable=False),
            "nola_basis_A": ParamSpec((k, r, site.in_features), trainable=False),
            "nola_basis_B": ParamSpec((k, site.out_features, r), trainable=False),
        }

    def init(self, site: Site, W: Tensor, calib: object, generator: torch.Generator) -> Params:
        A0, basis_A, basis_B = bases(
            self.basis_seed,
            site.path,
            self.num_basis,
            self.rank,
            site.in_features,
            site.out_features,
        )
        values = {
            "nola_alpha": torch.zeros(self.num_basis),
            "nola_beta": torch.zeros(self.num_basis),
            "nola_A0": A0,
            "nola_basis_A": basis_A,
            "nola_basis_B": basis_B,
        }
        return {name: v.to(W.dtype) for name, v in values.items()}

    def _factors(self, p: Params) -> tuple[Tensor, Tensor]:
        """(A [r, in], B [out, r]) from the coefficients and the bases."""
        k = self.num_basis
        basis_A, basis_B = p["nola_basis_A"], p["nola_basis_B"]
        A = p["nola_A0"] + (p["nola_alpha"] @ basis_A.flatten(1)).view(basis_A.shape[1:]) / (
            math.sqrt(k)
        )
        B = (p["nola_beta"] @ basis_B.flatten(1)).view(basis_B.shape[1:]) / math.sqrt(k)
        return A, B

    def forward(
        self, x: Tensor, base_out: Tensor, W: Tensor, p: Params, ctx: SiteContext
    ) -> Tensor:
        A, B = self._factors(p)
        return base_out + F.linear(F.linear(x, A), B) * self.scaling

    def merged_weight(self, site: Site, W: Tensor, p: Params) -> Tensor:
        """W + s·B·A, [out, in]."""
        A, B = self._factors(p)
        return W + (B @ A) * self.scaling

    def cost(self, site: Site) -> Cost:
        # A and B rebuilt from k bases each, then x·Aᵀ (r·in), ·Bᵀ (r·out) per token
        build = 2 * NUM_BASIS * R * (D_IN + D_OUT)
        flops_forward = build + 2 * T * R * (D_IN + D_OUT) + 2 * T * D_OUT
        return Cost(
            params=2 * NUM_BASIS,
            flops_forward=flops_forward,
            flops_backward=2 * flops_forward,
            activation_bytes=(T * R + R * (D_IN + D_OUT)) * dtype_bytes(site.dtype),
            symbols={**site_symbols(site, self.rank), NUM_BASIS: self.num_basis},
        )
