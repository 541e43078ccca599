"""PiSSA: LoRA initialised from the principal singular vectors of W; W becomes the residual.

Meng et al., "PiSSA: Principal Singular Values and Singular Vectors Adaptation of Large
Language Models" (NeurIPS 2024). With W = U·S·Vᵀ: A₀ = √(S_r/s)·V_rᵀ, B₀ = U_r·√(S_r/s), and
PEFT rewrites the base weight to W_res = W − s·B₀·A₀.

peftc never touches the user's weights. It keeps A₀, B₀ as frozen tensors and computes
    y = W·x + s·(B·A − B₀·A₀)·x = W·x + s·[B, −B₀]·[A; A₀]·x,
which equals W_res·x + s·B·A·x. A frozen pair costs r·(in + out) numbers per site where a
frozen residual weight would cost in·out, and the stacked form is one rank-2r LoRA: exactly
the converted adapter PEFT writes with `path_initial_model_for_weight_conversion`. So
`save_adapter` writes that converted form (a plain LoRA that applies to the original base),
and loading reads both it and PEFT's raw PiSSA checkpoints (rank r, A₀/B₀ rebuilt from W).

`ResidualLoRA` holds everything but the init; CorDA (corda.py) shares it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
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
    site_symbols,
)
from passes.adapters.contract import NON_NEGATIVE_INT, LowRank, hp, optional
from passes.adapters.lora import LORA_FIELDS, LORA_KEYS, NOT_DORA, LoRA
from passes.adapters.peft_record import PeftField, PeftFormat
from passes.adapters.registry import register
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

    def init(
        self, site: Site, W: torch.Tensor, calib: object, generator: torch.Generator
    ) -> dict[str, torch.Tensor]:
        A0, B0 = self.factors(site, W, calib, generator)  # each subclass derives them its way
        A0, B0 = A0.to(W.dtype).contiguous(), B0.to(W.dtype).contiguous()
        return {"lora_A": A0.clone(), "lora_B": B0.clone(), "lora_A0": A0, "lora_B0": B0}

    def forward(
        self,
        x: torch.Tensor,
        base_out: torch.Tensor,
        W: torch.Tensor,
        p: dict[str, torch.Tensor],
        ctx: SiteContext,
    ) -> torch.Tensor:
        A, B, A0, B0, s = p["lora_A"], p["lora_B"], p["lora_A0"], p["lora_B0"], self.scaling
        if self.dropout > 0 and ctx.training:
            # Dropout acts on the adapter's input only; the residual part is base weight.
            h = F.dropout(x, self.dropout, True)
            return base_out + F.linear(F.linear(h, A), B) * s - F.linear(F.linear(x, A0), B0) * s
        stacked_A = torch.cat([A, A0], dim=0)
        stacked_B = torch.cat([B, -B0], dim=1)
        return base_out + F.linear(F.linear(x, stacked_A), stacked_B) * s

    def merged_weight(
        self, site: Site, W: torch.Tensor, p: dict[str, torch.Tensor]
    ) -> torch.Tensor:
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


def niter_of(init: str) -> int | None:
    """PEFT's init_lora_weights "pissa" (exact SVD) or "pissa_niter_<N>" -> niter."""
    if init == "pissa":
        return None
    head, sep, tail = init.partition("_niter_")
    if head != "pissa" or not sep or not tail.isdigit():
        raise ValueError(f"init_lora_weights {init!r} is not 'pissa' or 'pissa_niter_<N>'")
    return int(tail)


@register("pissa")
@dataclass(frozen=True)
class PiSSA(ResidualLoRA):
    """`niter`: None for the exact SVD (init_lora_weights="pissa"), or the subspace iterations
    of a randomized SVD ("pissa_niter_N"), seeded from the spec's seed."""

    niter: int | None = hp(None, optional(NON_NEGATIVE_INT, "exact SVD"))

    peft = residual_format(
        "pissa", {"niter": PeftField("init_lora_weights", "pissa", read=niter_of)}
    )

    def factors(
        self, site: Site, W: torch.Tensor, calib: object, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # PEFT's pissa_init, on the [out, in] weight in fp32.
        weight = W.detach().to(torch.float32)
        r = self.rank
        if self.niter is None:
            U, S, Vh = torch.linalg.svd(weight, full_matrices=False)
            Ur, Sr, Vhr = U[:, :r], S[:r], Vh[:r]
        else:
            seed = int(torch.randint(0, 2**62, (1,), generator=generator))
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                Ur, Sr, V = torch.svd_lowrank(weight, r, niter=self.niter)
            Vhr = V.t()
        Sr = Sr / self.scaling
        A0 = torch.diag(torch.sqrt(Sr)) @ Vhr
        B0 = Ur @ torch.diag(torch.sqrt(Sr))
        return A0, B0
