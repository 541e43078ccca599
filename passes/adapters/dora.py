"""DoRA: y = (m / ‖W + s·B·A‖_row) ⊙ (W + s·B·A) x + bias, written on top of the base output.

Liu et al., "DoRA: Weight-Decomposed Low-Rank Adaptation" (ICML 2024). The magnitude m starts as
the row norms of W, so with B = 0 the adapter is the identity. As in PEFT (and the paper, §4.3)
the norm is detached from the gradient, and the base output is reused:
y = base + (m/n − 1)·(base − bias) + (m/n)·s·B·A·x.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import ClassVar

import torch
import torch.nn.functional as F

from passes.adapters.base import Params, ParamSpec, SiteContext, Tensor
from passes.adapters.cost import D_IN, D_OUT, Cost, R, T, dtype_bytes, site_symbols
from passes.adapters.lora import MODULE_OPS, LoRA
from passes.adapters.registry import register
from rewrite.sites import Site

MAGNITUDE = {"magnitude": "lora_magnitude_vector"}


@register("dora")
class DoRA(LoRA):
    """LoRA's hyperparameters, tensors, init and PEFT names, plus the magnitude vector."""

    batchable: ClassVar[bool] = False
    supported_ops: ClassVar[tuple[str, ...]] = MODULE_OPS
    peft = replace(
        LoRA.peft,
        when={**LoRA.peft.when, "use_dora": (True,)},
        keys={**LoRA.peft.keys, **MAGNITUDE},
        keys_by_op={op: {**keys, **MAGNITUDE} for op, keys in LoRA.peft.keys_by_op.items()},
        constants={"use_dora": True},
    )

    def check_site(self, site: Site) -> str | None:
        if site.conv is not None and site.conv.groups != 1:  # its norm needs the dense weight
            return f"{self.name} supports convolutions with groups=1 only (lora takes grouped ones)"
        return super().check_site(site)

    def _magnitude_shape(self, site: Site) -> tuple[int, ...]:
        if site.conv is not None:  # PEFT keeps the conv norm as [1, out, 1, ...]
            return (1, site.out_features, *(1,) * len(site.conv.kernel))
        return (site.out_features,)

    def params(self, site: Site) -> dict[str, ParamSpec]:
        return {**super().params(site), "magnitude": ParamSpec(self._magnitude_shape(site))}

    def init(self, site: Site, W: Tensor, calib: object, generator: torch.Generator) -> Params:
        p = super().init(site, W, calib, generator)
        with torch.no_grad():
            m = self._weight_norm(site, W.float(), self._delta(site, W, p["lora_A"], p["lora_B"]))
        return {**p, "magnitude": m.to(W.dtype)}

    # -- maths shared by forward and merge ----------------------------------------------

    def _delta(self, site: Site, W: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
        """s·B·A in W's layout: [out, in], [vocab, dim] for embeddings, [out, in, *k] for conv."""
        s = self.scaling
        if site.op == "embedding":
            return (B @ A).t() * s
        if site.conv is not None:
            return (B.reshape(B.shape[0], -1) @ A.reshape(A.shape[0], -1)).reshape(W.shape) * s
        return (B @ A) * s

    def _weight_norm(self, site: Site, W: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """‖W + s·B·A‖ per output unit, shaped like the magnitude."""
        V = W + delta
        if site.op == "embedding":
            return torch.linalg.norm(V.t(), dim=1)
        if site.conv is not None:
            return V.norm(p=2, dim=tuple(range(1, V.dim())), keepdim=True).transpose(1, 0)
        return torch.linalg.norm(V, dim=1)

    def forward(
        self, x: Tensor, base_out: Tensor, W: Tensor, p: Params, ctx: SiteContext
    ) -> Tensor:
        A, B, m, s = p["lora_A"], p["lora_B"], p["magnitude"], self.scaling
        site = ctx.site
        # Detached, as in the paper (§4.3) and PEFT: the norm gets no gradient.
        norm = self._weight_norm(site, W, self._delta(site, W, A.detach(), B.detach())).detach()
        scale = m / norm
        if site.op == "embedding":
            after_a = F.embedding(x, A.t(), padding_idx=site.padding_idx)
            return scale * base_out + scale * (after_a @ B.t()) * s
        dropped = self.dropout > 0 and ctx.training
        h = F.dropout(x, self.dropout, True) if dropped else x
        if site.conv is not None:
            conv = F.conv1d if site.op == "conv1d" else F.conv2d
            g = site.conv
            lora_out = conv(conv(h, A, None, g.stride, g.padding), B)
            if dropped:  # PEFT recomputes the base part on the dropped-out input
                base = conv(h, W, None, g.stride, g.padding, g.dilation, g.groups)
            elif ctx.bias is not None:
                base = base_out - ctx.bias.view(1, -1, *(1,) * (base_out.dim() - 2))
            else:
                base = base_out
            return base_out + (scale - 1) * base + scale * lora_out * s
        lora_out = F.linear(F.linear(h, A), B)
        if dropped:
            base = F.linear(h, W)
        elif ctx.bias is not None:
            base = base_out - ctx.bias
        else:
            base = base_out
        return base_out + (scale - 1) * base + scale * lora_out * s

    def merged_weight(self, site: Site, W: Tensor, p: Params) -> Tensor:
        """(m / ‖W + s·B·A‖) ⊙ (W + s·B·A), the factor applied per output unit."""
        delta = self._delta(site, W, p["lora_A"], p["lora_B"])
        factor = p["magnitude"] / self._weight_norm(site, W, delta)
        if site.op == "embedding":
            return (W + delta) * factor.view(1, -1)
        return (W + delta) * factor.reshape(-1, *(1,) * (W.dim() - 1))

    def cost(self, site: Site) -> Cost:
        k = math.prod(site.conv.kernel) if site.conv else 1
        params = R * (D_IN * k + D_OUT) + D_OUT
        lora_flops = 2 * T * R * (D_IN * k + D_OUT) + 2 * T * D_OUT
        # once per step: B·A, W + s·B·A and its row norms; per token: the two rescalings.
        norm_flops = 2 * R * D_IN * k * D_OUT + 3 * D_IN * k * D_OUT
        flops_forward = lora_flops + norm_flops + 3 * T * D_OUT
        activation = T * (R + D_OUT + (D_IN if self.dropout > 0 else 0))
        return Cost(
            params=params,
            flops_forward=flops_forward,
            flops_backward=2 * lora_flops + 2 * T * D_OUT,
            activation_bytes=activation * dtype_bytes(site.dtype),
            symbols=site_symbols(site, self.rank),
        )
