"""What PiSSA (pissa.py) and CorDA (corda.py) share: a LoRA whose initial product s·B₀·A₀ is
taken out of the base weight. peftc keeps A₀, B₀ frozen instead of touching the user's weights:
    y = W·x + s·(B·A − B₀·A₀)·x = W·x + s·[B, −B₀]·[A; A₀]·x,
which equals W_res·x + s·B·A·x with W_res = W − s·B₀·A₀. A frozen pair costs r·(in + out)
numbers per site where a frozen residual weight would cost in·out, and the stacked form is one
rank-2r LoRA: exactly the converted adapter PEFT writes with
`path_initial_model_for_weight_conversion`. So checkpoints are saved in that converted form (a
plain LoRA that applies to the original base), and PEFT's raw ones (rank r, A₀/B₀ rebuilt from
W) load too. Subclasses define `factors(site, W, calib, generator) -> (A₀, B₀)`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from passes.adapters.base import Params, ParamSpec, SiteContext, Tensor
from passes.adapters.contract import LowRank
from passes.adapters.cost import D_IN, D_OUT, Cost, R, T, dtype_bytes, site_symbols
from passes.adapters.lora import LORA_FIELDS, LORA_KEYS, NOT_DORA, LoRA
from passes.adapters.peft_record import PeftFormat
from rewrite.sites import Site


def as_plain_lora(m: ResidualLoRA) -> LoRA:
    """The converted checkpoint's method: a plain LoRA of rank 2r with the same scaling
    (s = alpha/r, or alpha/√r: doubling r needs alpha·2, or alpha·√2)."""
    alpha = m.alpha * (math.sqrt(2) if m.use_rslora else 2)
    return LoRA(rank=2 * m.rank, alpha=alpha, dropout=m.dropout, use_rslora=m.use_rslora)


def residual_format(init: str, extra_fields: dict) -> PeftFormat:
    """PEFT's LoraConfig(init_lora_weights=<init>...), saved in its converted form."""
    return PeftFormat(
        peft_type="LORA",
        config="LoraConfig",
        when={**NOT_DORA, "init_lora_weights": lambda v: isinstance(v, str) and v.startswith(init)},
        fields={**LORA_FIELDS, **extra_fields},
        keys=LORA_KEYS,
        saved_as=as_plain_lora,
    )


@dataclass(frozen=True)
class ResidualLoRA(LowRank):
    """A LoRA whose initial product s·B₀·A₀ is taken out of the base weight (frozen A₀, B₀)."""

    supported_ops: ClassVar[tuple[str, ...]] = ("linear", "addmm")

    def params(self, site: Site) -> dict[str, ParamSpec]:
        r, d_in, d_out = self.rank, site.in_features, site.out_features
        return {
            "lora_A": ParamSpec((r, d_in)),
            "lora_B": ParamSpec((d_out, r)),
            "lora_A0": ParamSpec((r, d_in), trainable=False),
            "lora_B0": ParamSpec((d_out, r), trainable=False),
        }

    def init(self, site: Site, W: Tensor, calib: object, generator: torch.Generator) -> Params:
        A0, B0 = self.factors(site, W, calib, generator)  # each subclass derives them its way
        A0, B0 = A0.to(W.dtype).contiguous(), B0.to(W.dtype).contiguous()
        return {"lora_A": A0.clone(), "lora_B": B0.clone(), "lora_A0": A0, "lora_B0": B0}

    def forward(
        self, x: Tensor, base_out: Tensor, W: Tensor, p: Params, ctx: SiteContext
    ) -> Tensor:
        A, B, A0, B0, s = p["lora_A"], p["lora_B"], p["lora_A0"], p["lora_B0"], self.scaling
        if self.dropout > 0 and ctx.training:
            # Dropout acts on the adapter's input only; the residual part is base weight.
            h = F.dropout(x, self.dropout, True)
            return base_out + F.linear(F.linear(h, A), B) * s - F.linear(F.linear(x, A0), B0) * s
        stacked_A = torch.cat([A, A0], dim=0)
        stacked_B = torch.cat([B, -B0], dim=1)
        return base_out + F.linear(F.linear(x, stacked_A), stacked_B) * s

    def merged_weight(self, site: Site, W: Tensor, p: Params) -> Tensor:
        """W_res + s·B·A with W_res = W − s·B₀·A₀, in [out, in] layout."""
        s = self.scaling
        return W - (p["lora_B0"] @ p["lora_A0"]) * s + (p["lora_B"] @ p["lora_A"]) * s

    def cost(self, site: Site) -> Cost:
        # Trainable: A and B. Forward: the stacked rank-2r LoRA.
        flops_forward = 2 * T * 2 * R * (D_IN + D_OUT) + 2 * T * D_OUT
        return Cost(
            params=R * (D_IN + D_OUT),
            flops_forward=flops_forward,
            flops_backward=2 * flops_forward,
            activation_bytes=T
            * (2 * R + (D_IN if self.dropout > 0 else 0))
            * dtype_bytes(site.dtype),
            symbols=site_symbols(site, self.rank),
        )

    # -- PEFT checkpoints ----------------------------------------------------------------

    def peft_tensors(self, site: Site, p: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The converted form: ΔW = B·A − B₀·A₀ = [B, −B₀]·[A; A₀], a rank-2r LoRA."""
        return {
            "lora_A.weight": torch.cat([p["lora_A"], p["lora_A0"]], dim=0),
            "lora_B.weight": torch.cat([p["lora_B"], -p["lora_B0"]], dim=1),
        }

    def params_from_peft(
        self, site: Site, tensors: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """Read the converted form (rank 2r) or PEFT's raw form (rank r, A₀/B₀ from init)."""
        A, B, r = tensors["lora_A.weight"], tensors["lora_B.weight"], self.rank
        if A.shape[0] == 2 * r and B.shape[1] == 2 * r:
            return {"lora_A": A[:r], "lora_A0": A[r:], "lora_B": B[:, :r], "lora_B0": -B[:, r:]}
        if A.shape[0] == r and B.shape[1] == r:
            return {"lora_A": A, "lora_B": B}
        raise ValueError(
            f"{self.name} at {site.path}: checkpoint lora_A {tuple(A.shape)} / lora_B "
            f"{tuple(B.shape)} fit neither rank {r} (PEFT's raw form) nor rank {2 * r} (the "
            "converted form); compile with the rank the adapter was trained with"
        )
