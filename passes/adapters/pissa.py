"""PiSSA: LoRA initialised from the principal singular vectors of W; W becomes the residual.

Meng et al., "PiSSA: Principal Singular Values and Singular Vectors Adaptation of Large
Language Models" (NeurIPS 2024). With W = U·S·Vᵀ: A₀ = √(S_r/s)·V_rᵀ, B₀ = U_r·√(S_r/s), and
PEFT rewrites the base weight to W_res = W − s·B₀·A₀.

The residual form, frozen A₀/B₀ and the converted checkpoints are `ResidualLoRA`'s
(residual_lora.py), which CorDA shares.
"""

from __future__ import annotations

import torch

from passes.adapters.contract import NON_NEGATIVE_INT, hp, optional
from passes.adapters.peft_record import PeftField
from passes.adapters.registry import register
from passes.adapters.residual_lora import ResidualLoRA, residual_format
from rewrite.sites import Site


def niter_of(init: str) -> int | None:
    """PEFT's init_lora_weights "pissa" (exact SVD) or "pissa_niter_<N>" -> niter."""
    if init == "pissa":
        return None
    head, sep, tail = init.partition("_niter_")
    if head != "pissa" or not sep or not tail.isdigit():
        raise ValueError(f"init_lora_weights {init!r} is not 'pissa' or 'pissa_niter_<N>'")
    return int(tail)


@register("pissa")
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
