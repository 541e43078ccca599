"""PaCA: y = x·W'ᵀ + b, W' = W with its input columns idx replaced by s·P (P trainable).

Woo et al., "PaCA: Partial Connection Adaptation for Efficient Fine-Tuning" (ICLR 2025).
r input columns idx are drawn per site; P (out×r) starts as W[:, idx]/s, s = alpha/rank, so
the adapter starts as the identity. The adapted layer is one matmul with W', not the base
matmul plus an adapter branch, and P's gradient s·gyᵀ·x[..., idx] needs only the r selected
input columns: that is where PaCA's speed and memory come from. Merged: W' itself.

In training graphs the forward replaces the base op: it does not read `base_out`, so the
base matmul is left without users and the cleanup pass removes it. It calls one custom op,
`peftc::paca_linear(x, x[..., idx], W, idx, P, b, s)`, whose registered backward computes
dx = gy·W' and dP = s·gyᵀ·x[..., idx] and saves only x[..., idx] (plain autograd through
linear(x, W') would form the full out×in gradient of W' and keep all of x). The official
code instead writes s·P into W in place and uses a custom autograd.Function; torch.export
inlines such a Function and drops its backward, so peftc needs the custom op. Eval graphs
keep the base op, which the merge pass folds W' into (it reroutes the adapter's output to
it), and add the small x[..., idx]·(s·P − W[:, idx])ᵀ in plain ATen; merged, there is none.

Choices: idx = randperm(in)[:r] from the spec-seeded generator (sites draw in plan order),
then sorted (the reference leaves it unsorted; the order only pairs P's columns with W's).
idx is a frozen int64 tensor saved with the checkpoint (save_frozen). No dropout: the
reference has none, and it would change the base path too.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F

from passes.adapters.base import Params, ParamSpec, SiteContext, Tensor
from passes.adapters.contract import POSITIVE_INT, POSITIVE_NUMBER, Method, hp
from passes.adapters.cost import D_OUT, Cost, R, T, dtype_bytes, site_symbols
from passes.adapters.registry import register
from rewrite.sites import Site


@torch.library.custom_op("peftc::paca_linear", mutates_args=())
def paca_linear(
    x: Tensor, x_idx: Tensor, W: Tensor, idx: Tensor, P: Tensor, bias: Tensor | None, s: float
) -> Tensor:
    """linear(x, W with columns idx set to s·P, bias); x_idx = x[..., idx], kept for dP."""
    return F.linear(x, W.index_copy(1, idx, P * s), bias)


@paca_linear.register_fake
def _paca_linear_fake(x, x_idx, W, idx, P, bias, s):
    return x.new_empty((*x.shape[:-1], W.shape[0]))


def _paca_setup(ctx, inputs, output) -> None:
    x, x_idx, W, idx, P, bias, s = inputs
    ctx.save_for_backward(x_idx, W, idx, P)
    ctx.s = s


def _paca_backward(ctx, gy):
    x_idx, W, idx, P = ctx.saved_tensors
    g2 = gy.reshape(-1, gy.shape[-1])
    dx = gy @ W.index_copy(1, idx, P * ctx.s) if ctx.needs_input_grad[0] else None
    dP = None
    if ctx.needs_input_grad[4]:
        dP = (g2.t() @ x_idx.reshape(-1, x_idx.shape[-1])) * ctx.s
    db = g2.sum(0) if ctx.needs_input_grad[5] else None
    return dx, None, None, None, dP, db, None


paca_linear.register_autograd(_paca_backward, setup_context=_paca_setup)


@register("paca")
class PaCA(Method):
    rank: int = hp(8, POSITIVE_INT, "the number of input columns trained")
    alpha: float = hp(8.0, POSITIVE_NUMBER)

    supported_ops: ClassVar[tuple[str, ...]] = ("linear", "addmm")
    save_frozen: ClassVar[bool] = True  # idx is random: it is part of the checkpoint

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def check_site(self, site: Site) -> str | None:
        if self.rank > site.in_features:
            return (
                f"rank {self.rank} is more input columns than the layer has "
                f"(in_features={site.in_features}); lower the rank"
            )
        return None

    def params(self, site: Site) -> dict[str, ParamSpec]:
        return {
            "paca_w": ParamSpec((site.out_features, self.rank)),
            "paca_indices": ParamSpec((self.rank,), trainable=False, dtype=torch.int64),
        }

    def init(self, site: Site, W: Tensor, calib: object, generator: torch.Generator) -> Params:
        idx = torch.randperm(site.in_features, generator=generator)[: self.rank].sort().values
        P = W.detach()[:, idx.to(W.device)].float() / self.scaling
        return {"paca_w": P.to(W.dtype).contiguous(), "paca_indices": idx}

    def forward(
        self, x: Tensor, base_out: Tensor, W: Tensor, p: Params, ctx: SiteContext
    ) -> Tensor:
        idx, P = p["paca_indices"], p["paca_w"]
        x_idx = x.index_select(-1, idx)
        if ctx.training:
            return paca_linear(x, x_idx, W, idx, P, ctx.bias, self.scaling)
        # eval: keep the base op (merge folds W' into it), add x[..., idx]·(s·P - W[:, idx])ᵀ
        return base_out + F.linear(x_idx, P * self.scaling - W.index_select(1, idx))

    def merged_weight(self, site: Site, W: Tensor, p: Params) -> Tensor:
        """W with columns idx replaced by s·P, in [out, in] layout."""
        idx = p["paca_indices"].to(W.device)
        return W.index_copy(1, idx, (p["paca_w"] * self.scaling).to(W.dtype))

    def cost(self, site: Site) -> Cost:
        # The training graph's matmul replaces the base one (same size): the overhead is s·P
        # and the column copy forward, and dP = s·gyᵀ·x[..., idx] backward (dx is the base's
        # own). The unmerged eval graph adds 2·T·r·out for its x[..., idx]·(s·P − W[:, idx])ᵀ.
        flops_forward = D_OUT * R
        return Cost(
            params=D_OUT * R,
            flops_forward=flops_forward,
            flops_backward=2 * T * R * D_OUT + D_OUT * R,
            activation_bytes=T * R * dtype_bytes(site.dtype),  # x[..., idx] only
            symbols=site_symbols(site, self.rank),
        )
