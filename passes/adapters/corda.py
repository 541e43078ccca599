"""CorDA: LoRA initialised from the SVD of W·C, C the covariance of the layer's inputs.

Yang et al., "CorDA: Context-Oriented Decomposition Adaptation of Large Language Models"
(NeurIPS 2024). With W·C = U·S·Vhᵀ and V = (Vh·C⁻¹)ᵀ: A₀ = √(S_r/s)·V_rᵀ, B₀ = U_r·√(S_r/s),
taking the r largest components ("ipm", instruction-previewed) or the r smallest ("kpm",
knowledge-preserved). As with PiSSA the base weight becomes W − s·B₀·A₀; peftc keeps A₀/B₀
frozen instead of touching W (see pissa.py) and saves PEFT's converted rank-2r LoRA.

Follows PEFT's `preprocess_corda`: each calibration batch's inputs are divided by their
maximum, C is the mean over batches of XᵀX, and C is damped by 1% of its mean diagonal
(doubled until C·C⁻¹ is within 0.05 of I). PEFT hooks one sequence per forward call; here a
batch of any size counts as one call.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from passes.adapters.contract import hp, one_of
from passes.adapters.peft_record import PeftField
from passes.adapters.registry import register
from passes.adapters.residual_lora import ResidualLoRA, residual_format
from rewrite.sites import Site

MAX_DAMP_DOUBLINGS = 40


@register("corda")
class CorDA(ResidualLoRA):
    corda_method: str = hp("ipm", one_of("ipm", "kpm"))

    needs_calibration: ClassVar[bool] = True
    peft = residual_format("corda", {"corda_method": PeftField("corda_config.corda_method", "ipm")})

    def factors(
        self,
        site: Site,
        W: torch.Tensor,
        calib: list[torch.Tensor] | None,
        generator: torch.Generator,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if calib is None:
            raise ValueError(
                f"corda at {site.path}: the frozen part of a CorDA adapter is rebuilt from "
                "calibration data. Pass the batches PEFT's preprocess_corda saw as "
                "peftc.from_peft(..., calibration=batches), or save the PEFT adapter converted "
                "(save_pretrained(..., path_initial_model_for_weight_conversion=...)), which "
                "loads as plain LoRA"
            )
        cov = covariance(calib)
        U, S, V = decompose(W.detach().to(torch.float32), cov)
        r = self.rank
        if self.corda_method == "ipm":
            U, S, V = U[:, :r], S[:r], V[:, :r]
        else:
            U, S, V = U[:, -r:], S[-r:], V[:, -r:]
        S = S / self.scaling
        A0 = V.t() * S.sqrt().view(-1, 1)
        B0 = U * S.sqrt()
        return A0, B0


def covariance(calib: list[torch.Tensor]) -> torch.Tensor:
    """Mean over batches of XᵀX, each batch X scaled by |max(X)| (PEFT's calib_cov_distribution)."""
    if not calib:
        raise ValueError("corda needs at least one calibration batch")
    total = None
    for rows in calib:
        x = rows.detach().to(torch.float32)
        x = x / torch.max(x).abs()
        if not torch.isfinite(x).all():
            raise ValueError(
                "corda: a calibration batch gives NaN/Inf inputs at this layer (an all-zero "
                "batch divides by 0); use other calibration batches"
            )
        c = x.t() @ x
        total = c if total is None else total + c
    return total / len(calib)


def decompose(
    W: torch.Tensor, cov: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """U, S, V with W·C = U·S·Vhᵀ and V = (Vh·C⁻¹)ᵀ, C damped until it inverts cleanly."""
    n = cov.shape[0]
    eye = torch.eye(n, dtype=cov.dtype)
    damp = 0.01
    for _ in range(MAX_DAMP_DOUBLINGS):
        fixed = cov + torch.diag(torch.ones(n) * torch.mean(torch.diag(cov)) * damp)
        inv = torch.linalg.inv(fixed)
        if torch.dist(fixed @ inv, eye).item() < 0.05:
            break
        damp *= 2
    else:
        raise ValueError(
            "corda: the input covariance cannot be inverted even with heavy damping; the "
            "calibration inputs of this layer are degenerate (constant or zero)"
        )
    U, S, Vh = torch.linalg.svd(W @ fixed, full_matrices=False)
    return U, S, (Vh @ inv).transpose(0, 1)
