"""The SVD shared by the methods that keep W's singular vectors frozen (LoRA-XS, EDoRA, SVFT,
the spectral adapter): fp32, and one sign per singular pair fixed by a rule instead of by the
LAPACK build. Those factors are rebuilt from W when a checkpoint loads, not saved, so a sign
that flipped between machines would put the trained tensors against other factors."""

from __future__ import annotations

import torch


def svd(W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U, S, Vh) of the [out, in] weight in fp32 (reduced), each pair (U[:, k], Vh[k]) signed
    so that the entry of U[:, k] largest in magnitude is positive."""
    U, S, Vh = torch.linalg.svd(W.detach().float(), full_matrices=False)
    peak = U.abs().argmax(dim=0)
    signs = torch.sign(U[peak, torch.arange(U.shape[1])])
    signs = torch.where(signs == 0, torch.ones_like(signs), signs)
    return U * signs, S, Vh * signs[:, None]
