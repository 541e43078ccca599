"""Hydra: a parallel and a sequential low-rank branch, y = h + B_p·A_p·x + B_s·A_s·h, h = x·Wᵀ + b.

Kim et al., "Hydra: Multi-head Low-rank Adaptation for Parameter Efficient Fine-tuning"
(arXiv 2309.06922). The parallel branch is a LoRA on the input (A_p r×in, B_p out×r); the
sequential one a LoRA on the base output (A_s r_s×out, B_s out×r_s). Each A is
Kaiming-uniform (a = √5) and each B zero, so the adapter starts as the identity. No scale, as
in the reference. `seq_rank` defaults to `rank`.

Merged: W' = W + B_p·A_p + B_s·A_s·W and b' = b + B_s·A_s·b: the sequential branch changes the
bias, so Hydra defines `merged_bias` (the merge pass folds both; a bias-free base needs none,
as b = 0). Choices: the paper's formula is followed (the reference's RoBERTa wiring has a typo
that disables the sequential branch).
"""

from __future__ import annotations

import math
from typing import ClassVar

import sympy
import torch
import torch.nn.functional as F

from passes.adapters.base import Params, ParamSpec, SiteContext, Tensor
from passes.adapters.contract import POSITIVE_INT, Method, hp, optional, rank_too_large
from passes.adapters.cost import D_IN, D_OUT, Cost, R, T, dtype_bytes, site_symbols
from passes.adapters.registry import register
from rewrite.sites import Site

R_SEQ = sympy.Symbol("r_seq", positive=True, integer=True)


@register("hydra")
class Hydra(Method):
    rank: int = hp(4, POSITIVE_INT, "the parallel branch's rank")
    seq_rank: int | None = hp(
        None, optional(POSITIVE_INT, "seq_rank = rank"), "the sequential branch's rank"
    )

    supported_ops: ClassVar[tuple[str, ...]] = ("linear", "addmm")

    @property
    def r_seq(self) -> int:
        return self.rank if self.seq_rank is None else self.seq_rank

    def check_site(self, site: Site) -> str | None:
        i, o = site.in_features, site.out_features
        if why := rank_too_large(self.rank, i, o):
            return why
        if self.r_seq > o:
            return (
                f"seq_rank {self.r_seq} is larger than out_features {o} (the sequential branch "
                "maps the base output to itself); lower seq_rank"
            )
        return None

    def params(self, site: Site) -> dict[str, ParamSpec]:
        r, rs, i, o = self.rank, self.r_seq, site.in_features, site.out_features
        return {
            "hydra_par_A": ParamSpec((r, i)),
            "hydra_par_B": ParamSpec((o, r)),
            "hydra_seq_A": ParamSpec((rs, o)),
            "hydra_seq_B": ParamSpec((o, rs)),
        }

    def init(self, site: Site, W: Tensor, calib: object, generator: torch.Generator) -> Params:
        out = {}
        for name, spec in self.params(site).items():
            t = torch.zeros(spec.shape)
            if name.endswith("_A"):
                torch.nn.init.kaiming_uniform_(t, a=math.sqrt(5), generator=generator)
            out[name] = t.to(W.dtype)
        return out

    def forward(
        self, x: Tensor, base_out: Tensor, W: Tensor, p: Params, ctx: SiteContext
    ) -> Tensor:
        parallel = F.linear(F.linear(x, p["hydra_par_A"]), p["hydra_par_B"])
        sequential = F.linear(F.linear(base_out, p["hydra_seq_A"]), p["hydra_seq_B"])
        return base_out + parallel + sequential

    def merged_weight(self, site: Site, W: Tensor, p: Params) -> Tensor:
        """W + B_p·A_p + B_s·A_s·W in [out, in] layout (the bias: `merged_bias`)."""
        seq = p["hydra_seq_B"] @ p["hydra_seq_A"]
        return W + p["hydra_par_B"] @ p["hydra_par_A"] + seq @ W

    def merged_bias(self, site: Site, W: Tensor, b: Tensor, p: Params) -> Tensor:
        """b + B_s·A_s·b: the sequential branch reads the base output, bias included."""
        return b + p["hydra_seq_B"] @ (p["hydra_seq_A"] @ b)

    def cost(self, site: Site) -> Cost:
        # per token: the parallel LoRA (2·r·(in + out)), the sequential one (2·r_s·2·out), adds
        flops_forward = 2 * T * R * (D_IN + D_OUT) + 4 * T * R_SEQ * D_OUT + 2 * T * D_OUT
        symbols = {**site_symbols(site, self.rank), R_SEQ: self.r_seq}
        return Cost(
            params=R * (D_IN + D_OUT) + 2 * R_SEQ * D_OUT,
            flops_forward=flops_forward,
            flops_backward=2 * flops_forward,
            activation_bytes=T * (R + R_SEQ) * dtype_bytes(site.dtype),
            symbols=symbols,
        )
