"""LoRA: y = base(x) + s · B(A(dropout(x))), s = alpha/r (or alpha/√r with rsLoRA).

Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models" (ICLR 2022);
Kalajdzievski, "A Rank Stabilization Scaling Factor for Fine-Tuning with LoRA" (2023).
A is Kaiming-uniform and B zero, as in PEFT, so the adapter starts as the identity.
On an expert site (a 3-D weight of a mixture-of-experts layer) each expert e has its own
A_e [r, in] and B_e [out, r]: W_e + s·B_e·A_e, computed in weight space each step as PEFT's
`target_parameters` does (the grouped matmul then multiplies by the adapted weights).

`LoRAUpdate` is the B·A update itself (tensors, forward, merge, cost), shared by the
methods that differ from LoRA only in how A and B start (EVA).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from passes.adapters.base import Params, ParamSpec, SiteContext, Tensor
from passes.adapters.contract import LowRank, hp, one_of
from passes.adapters.cost import D_IN, D_OUT, Cost, R, T, dtype_bytes, site_symbols
from passes.adapters.peft_record import PeftField, PeftFormat
from passes.adapters.registry import register
from rewrite.sites import Site

INITS = one_of("kaiming", "gaussian")
# the layer ops of the LoRA family; plain LoRA also takes expert weights (its subclasses, whose
# updates are not tested there, do not)
MODULE_OPS = ("linear", "addmm", "conv1d", "conv2d", "embedding")

# LoraConfig's fields of the LoRA-family hyperparameters, shared by every method PEFT stores
# as a LoraConfig (DoRA, PiSSA, CorDA, EVA, LoRA+).
LORA_FIELDS = {
    "rank": PeftField("r", 8, pattern="rank_pattern", read=int),
    "alpha": PeftField("lora_alpha", 8, pattern="alpha_pattern"),
    "dropout": PeftField("lora_dropout", 0.0, read=float),
    "use_rslora": PeftField("use_rslora", False, read=bool),
}
INIT_FIELD = PeftField(
    "init_lora_weights",
    True,
    read=lambda v: "gaussian" if v == "gaussian" else "kaiming",
    write=lambda v: "gaussian" if v == "gaussian" else True,
    init_only=True,
)
LORA_KEYS = {"lora_A": "lora_A.weight", "lora_B": "lora_B.weight"}
EMBEDDING_KEYS = {"embedding": {"lora_A": "lora_embedding_A", "lora_B": "lora_embedding_B"}}
NOT_DORA = {"use_dora": (False,)}


@dataclass(frozen=True)
class LoRAUpdate(LowRank):
    """y = base + s·B·A·x on linear, conv and embedding sites; subclasses define `init`."""

    def params(self, site: Site) -> dict[str, ParamSpec]:
        r = self.rank
        if site.experts is not None:
            return {
                "lora_A": ParamSpec((site.experts, r, site.in_features)),
                "lora_B": ParamSpec((site.experts, site.out_features, r)),
            }
        if site.op == "embedding":
            return {
                "lora_A": ParamSpec((r, site.in_features)),
                "lora_B": ParamSpec((site.out_features, r)),
            }
        if site.conv is not None:  # A a full conv, B 1x1 in the site's groups (as PEFT)
            ones = (1,) * len(site.conv.kernel)
            return {
                "lora_A": ParamSpec((r, site.in_features, *site.conv.kernel)),
                "lora_B": ParamSpec((site.out_features, r // site.conv.groups, *ones)),
            }
        return {
            "lora_A": ParamSpec((r, site.in_features)),
            "lora_B": ParamSpec((site.out_features, r)),
        }

    def forward(
        self, x: Tensor, base_out: Tensor, W: Tensor, p: Params, ctx: SiteContext
    ) -> Tensor:
        A, B, s = p["lora_A"], p["lora_B"], self.scaling
        site = ctx.site
        if site.op == "embedding":
            after_a = F.embedding(x, A.t(), padding_idx=site.padding_idx)
            return base_out + (after_a @ B.t()) * s
        h = F.dropout(x, self.dropout, ctx.training) if self.dropout > 0 else x
        if site.conv is not None:
            conv = F.conv1d if site.op == "conv1d" else F.conv2d
            g = site.conv
            lora_out = conv(conv(h, A, None, g.stride, g.padding), B, groups=g.groups)
            return base_out + lora_out * s
        return base_out + F.linear(F.linear(h, A), B) * s

    def merged_weight(self, site: Site, W: Tensor, p: Params) -> Tensor:
        """W + s·B·A in the site's logical [out, in] (or [vocab, dim] for embeddings) layout.
        On a grouped convolution the update reaches every input channel, so the merged
        weight is the dense [out, in, *k] one (the merge pass sets the conv's groups to 1)."""
        A, B, s = p["lora_A"], p["lora_B"], self.scaling
        if site.op == "embedding":
            return W + (B @ A).t() * s
        if site.conv is not None and site.conv.groups > 1:
            return _dense(site, W) + _grouped_delta(site, A, B) * s
        if site.experts is not None:  # per expert: [E, out, r] @ [E, r, in]
            return W + torch.bmm(B, A) * s
        if site.conv is not None:
            if all(k == 1 for k in site.conv.kernel):
                delta = (B.flatten(1) @ A.flatten(1)).view(W.shape)
            else:
                conv = F.conv1d if site.op == "conv1d" else F.conv2d
                delta = conv(A.transpose(0, 1), B).transpose(0, 1)
            return W + delta * s
        return W + (B @ A) * s

    def cost(self, site: Site) -> Cost:
        k = 1
        for d in site.conv.kernel if site.conv else ():
            k *= d
        groups = site.conv.groups if site.conv else 1
        params = R * (D_IN * k + D_OUT / groups)
        flops_forward = 2 * T * R * (D_IN * k + D_OUT / groups) + 2 * T * D_OUT
        if site.experts is not None:  # the update is formed in weight space, once a step
            params = site.experts * R * (D_IN + D_OUT)
            flops_forward = site.experts * (2 * R + 1) * D_IN * D_OUT
        return Cost(
            params=params,
            flops_forward=flops_forward,
            flops_backward=2 * flops_forward,
            activation_bytes=T * (R + (D_IN if self.dropout > 0 else 0)) * dtype_bytes(site.dtype),
            symbols=site_symbols(site, self.rank),
        )


def _dense(site: Site, W: Tensor) -> Tensor:
    """A grouped conv weight [out, in/groups, *k] as the dense [out, in, *k] one."""
    g = site.conv.groups
    out_g, in_g = site.out_features // g, site.in_features // g
    dense = W.new_zeros((site.out_features, site.in_features, *W.shape[2:]))
    for j in range(g):
        dense[j * out_g : (j + 1) * out_g, j * in_g : (j + 1) * in_g] = W[
            j * out_g : (j + 1) * out_g
        ]
    return dense


def _grouped_delta(site: Site, A: Tensor, B: Tensor) -> Tensor:
    """B·A for a full conv A [r, in, *k] and a grouped 1x1 conv B [out, r/groups, 1...]:
    output channel o of group j sums group j's slice of A's channels."""
    g, r = site.conv.groups, A.shape[0]
    A_g = A.reshape(g, r // g, -1)
    B_g = B.reshape(g, site.out_features // g, r // g)
    return torch.bmm(B_g, A_g).reshape(site.out_features, *A.shape[1:])


@register("lora")
class LoRA(LoRAUpdate):
    init_weights: str = hp("kaiming", INITS)

    supported_ops: ClassVar[tuple[str, ...]] = (*MODULE_OPS, "experts")
    batchable: ClassVar[bool] = True
    peft = PeftFormat(
        peft_type="LORA",
        config="LoraConfig",
        when={**NOT_DORA, "init_lora_weights": (True, False, "gaussian")},
        fields={**LORA_FIELDS, "init_weights": INIT_FIELD},
        keys=LORA_KEYS,
        keys_by_op=EMBEDDING_KEYS,
        constants={"use_dora": False},
        fan_in_fan_out=True,
    )

    def check_site(self, site: Site) -> str | None:
        if why := super().check_site(site):
            return why
        if site.experts is not None and self.dropout > 0:
            return (
                f"{self.name} adapts expert weights in weight space, where there is no input "
                "to drop out; set dropout: 0 for the expert targets"
            )
        if site.conv is None:
            return None
        if set(site.conv.dilation) != {1}:
            return f"{self.name} supports convolutions with dilation=1 only"
        if self.rank % site.conv.groups:
            return (
                f"{self.name} on a convolution with groups={site.conv.groups} needs a rank "
                f"divisible by {site.conv.groups} (rank is {self.rank}); set rank to a multiple"
            )
        return None

    def init(self, site: Site, W: Tensor, calib: object, generator: torch.Generator) -> Params:
        shapes = self.params(site)
        # an expert site's A is drawn as PEFT's [experts·r, in] Linear weight (fan-in: in)
        drawn = shapes["lora_A"].shape
        if site.experts is not None:
            drawn = (site.experts * self.rank, site.in_features)
        A = torch.empty(drawn, dtype=torch.float32)
        B = torch.zeros(shapes["lora_B"].shape, dtype=torch.float32)
        if site.op == "embedding":  # PEFT: A zero, B normal for embeddings
            A.zero_()
            B.normal_(generator=generator)
        elif self.init_weights == "gaussian":
            A.normal_(std=1.0 / self.rank, generator=generator)
        else:
            torch.nn.init.kaiming_uniform_(A, a=math.sqrt(5), generator=generator)
        A = A.reshape(shapes["lora_A"].shape)
        return {"lora_A": A.to(W.dtype), "lora_B": B.to(W.dtype)}
