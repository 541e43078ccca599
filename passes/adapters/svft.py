"""SVFT: W' = U·(Σ + σ(g)·M)·Vᵀ, M a sparse trainable n×n matrix in W's singular basis.

Lingam et al., "SVFT: Parameter-Efficient Fine-Tuning with Singular Vectors" (NeurIPS 2024).
U (out×n) and Vᵀ (n×in) come from the SVD of W (fp32) and are frozen. M holds k trainable
values at fixed positions, Kaiming-normal (fan_in = k); the gate g is a trainable scalar at 0,
so σ(g) = 0.5 and the model moves at init. With off_diag = d, k = n(2d+1) − d(d+1):
- `banded`: the band |i − j| ≤ d (d = 0 is SVFT-plain: the diagonal), row-major;
- `random`: k (row, col) pairs drawn uniformly (repeats allowed and summed, as the official
  SparseTensor does), from `seed` and the site's path, so a load regenerates them;
- `top_k`: the official rule, the k largest entries of U·V (n×n) for a square W, else of
  whichever of U (out ≤ in) and Vᵀ (in < out) is square; derived from W, so rebuilt at load.
The forward never forms M: y = base + σ(g)·scatter_rows(values ⊙ (x·V)[cols])·Uᵀ.

Choices. With rank = None, n = min(in, out) and U·Σ·Vᵀ = W, so W' = W + σ(g)·U·M·Vᵀ exactly as
the reference. With rank = r < min(in, out), peftc keeps W's tail, W' = W + σ(g)·U_r·M·V_rᵀ,
where the official code rebuilds only U_r(Σ_r + σ(g)M)V_rᵀ and so drops it; `top_k` then
reads the leading r×r block of its full-rank coefficient matrix (the official one indexes out
of range there). The official `fill_orthonormal` option is not offered. Merged: W'.
"""

from __future__ import annotations

import zlib
from typing import ClassVar

import sympy
import torch
import torch.nn.functional as F

from passes.adapters.base import Params, ParamSpec, SiteContext, Tensor
from passes.adapters.contract import (
    NON_NEGATIVE_INT,
    POSITIVE_INT,
    Method,
    hp,
    one_of,
    optional,
)
from passes.adapters.cost import D_IN, D_OUT, Cost, R, T, dtype_bytes, site_symbols
from passes.adapters.registry import register
from passes.adapters.svd import svd
from rewrite.sites import Site

OFF_DIAG = sympy.Symbol("off_diag", nonnegative=True, integer=True)


def entries(n, d):
    """k = n(2d+1) − d(d+1): the banded pattern's count, used by every pattern."""
    return n * (2 * d + 1) - d * (d + 1)


@register("svft")
class SVFT(Method):
    pattern: str = hp("banded", one_of("banded", "random", "top_k"), "where M's entries sit")
    off_diag: int = hp(0, NON_NEGATIVE_INT, "off-diagonals of the band; 0 is SVFT-plain")
    rank: int | None = hp(None, optional(POSITIVE_INT, "all min(in, out) singular vectors"))
    seed: int = hp(0, NON_NEGATIVE_INT, "the random pattern's positions")

    supported_ops: ClassVar[tuple[str, ...]] = ("linear", "addmm")
    starts_as_identity: ClassVar[bool] = False  # σ(0)·M = M/2 ≠ 0

    def _n(self, site: Site) -> int:
        return min(site.in_features, site.out_features) if self.rank is None else self.rank

    def check_site(self, site: Site) -> str | None:
        full = min(site.in_features, site.out_features)
        if self.rank is not None and self.rank > full:
            return (
                f"rank {self.rank} is larger than the layer's number of singular vectors "
                f"(min(in={site.in_features}, out={site.out_features}) = {full}); lower the "
                "rank or leave it null"
            )
        if self.off_diag >= self._n(site):
            return (
                f"off_diag {self.off_diag} needs an n×n M with n > {self.off_diag}, but n is "
                f"{self._n(site)}; lower off_diag below {self._n(site)}"
            )
        return None

    def params(self, site: Site) -> dict[str, ParamSpec]:
        n, k = self._n(site), entries(self._n(site), self.off_diag)
        return {
            "svft_values": ParamSpec((k,)),
            "svft_gate": ParamSpec((1,)),
            "svft_U": ParamSpec((site.out_features, n), trainable=False),
            "svft_V": ParamSpec((n, site.in_features), trainable=False),
            # (row, col) of each value in M: fixed by the pattern, W and seed, never saved
            "svft_indices": ParamSpec((2, k), trainable=False, dtype=torch.int64),
        }

    def positions(self, site: Site, U: Tensor, Vh: Tensor) -> Tensor:
        """[2, k] (row, col) of M's entries; U, Vh the full-rank fp32 singular vectors."""
        n, d = self._n(site), self.off_diag
        k = entries(n, d)
        if self.pattern == "banded":
            i, j = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
            return torch.stack([i[(i - j).abs() <= d], j[(i - j).abs() <= d]])
        if self.pattern == "random":
            g = torch.Generator().manual_seed(self.seed + zlib.crc32(site.path.encode()))
            return torch.randint(0, n, (2, k), generator=g)
        if U.shape == Vh.shape:
            coeffs = U @ Vh.t()
        else:
            coeffs = U if U.shape[0] == U.shape[1] else Vh
        flat = torch.topk(coeffs[:n, :n].reshape(-1), k).indices
        return torch.stack([flat // n, flat % n])

    def init(self, site: Site, W: Tensor, calib: object, generator: torch.Generator) -> Params:
        n = self._n(site)
        U, _, Vh = svd(W)
        idx = self.positions(site, U, Vh)
        values = torch.empty(1, idx.shape[1])
        torch.nn.init.kaiming_normal_(values, generator=generator)  # fan_in = k
        return {
            "svft_values": values[0].to(W.dtype),
            "svft_gate": torch.zeros(1, dtype=W.dtype),
            "svft_U": U[:, :n].to(W.dtype).contiguous(),
            "svft_V": Vh[:n].to(W.dtype).contiguous(),
            "svft_indices": idx,
        }

    def forward(
        self, x: Tensor, base_out: Tensor, W: Tensor, p: Params, ctx: SiteContext
    ) -> Tensor:
        idx = p["svft_indices"]
        z = F.linear(x, p["svft_V"])  # x·V, [..., n]
        gated = p["svft_values"] * torch.sigmoid(p["svft_gate"])
        mz = torch.zeros_like(z).index_add(-1, idx[0], z.index_select(-1, idx[1]) * gated)
        return base_out + F.linear(mz, p["svft_U"])

    def merged_weight(self, site: Site, W: Tensor, p: Params) -> Tensor:
        """W + σ(g)·U·M·Vᵀ (= U·(Σ + σ(g)·M)·Vᵀ at full rank)."""
        idx = p["svft_indices"].long()  # the merge pass hands every tensor over as float
        n = p["svft_U"].shape[1]
        gated = p["svft_values"] * torch.sigmoid(p["svft_gate"])
        M = W.new_zeros(n, n).index_put((idx[0], idx[1]), gated, accumulate=True)
        return W + p["svft_U"] @ M @ p["svft_V"]

    def cost(self, site: Site) -> Cost:
        n = sympy.Min(D_IN, D_OUT) if self.rank is None else R
        k = entries(n, OFF_DIAG)
        symbols = {**site_symbols(site, self._n(site)), OFF_DIAG: self.off_diag}
        # per token: x·V (n·in), the gather-scale-scatter (k), ·Uᵀ (n·out), the add
        flops_forward = 2 * T * n * (D_IN + D_OUT) + 2 * T * k + T * D_OUT + k
        return Cost(
            params=k + 1,
            flops_forward=flops_forward,
            flops_backward=2 * flops_forward,
            activation_bytes=T * (2 * n + k) * dtype_bytes(site.dtype),  # x·V, gathered, M·x·V
            symbols=symbols,
        )
