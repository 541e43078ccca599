"""EVA's init (eva.py): the top-r principal directions of a layer's inputs, found by PEFT's
incremental PCA over the calibration batches, with the same arithmetic so that the same
batches give the same components."""

from __future__ import annotations

import torch
import torch.nn.functional as F

MAX_PASSES = 100  # over the calibration batches; PEFT loops until convergence
PCA_SEED = 42  # PEFT's lowrank_seed


def eva_components(
    calib: list[torch.Tensor], rank: int, tau: float, whiten: bool, where: str = "site"
) -> torch.Tensor:
    """The [rank, in] EVA init of one layer from its input rows, batch by batch (PEFT's loop)."""
    if not calib:
        raise ValueError(f"eva at {where}: calibration gave no batches")
    if all(rows.shape[0] < rank for rows in calib):
        raise ValueError(
            f"eva at {where}: every calibration batch has fewer tokens than rank {rank}; "
            "use larger batches or a lower rank"
        )
    pca = _IncrementalPCA(rank)
    for step in range(MAX_PASSES * len(calib)):
        rows = calib[step % len(calib)]
        if rows.shape[0] < rank:  # PEFT skips such batches too
            continue
        previous = None if pca.components is None else pca.components.clone()
        pca.partial_fit(rows.detach().to(torch.float32))
        if previous is None:
            continue
        if (F.cosine_similarity(pca.components, previous) >= tau).all():
            break
    else:
        raise ValueError(
            f"eva at {where}: the input components did not settle (cosine >= tau={tau}) within "
            f"{MAX_PASSES} passes over the calibration batches; lower tau or give more batches"
        )
    A = pca.components[:rank]
    if whiten:
        A = A / pca.singular_values[:rank].sqrt().reshape(-1, 1)
    return A


class _IncrementalPCA:
    """PEFT's IncrementalPCA (after scikit-learn) with lowrank=True, seed 42: only what EVA uses.

    The arithmetic, dtypes and in-place steps follow PEFT's line by line, so that the same
    batches give the same components."""

    def __init__(self, n_components: int):
        self.n_components = n_components
        self.q = 2 * n_components
        self.components: torch.Tensor | None = None
        self.singular_values: torch.Tensor | None = None
        self.mean: torch.Tensor | None = None
        self.var: torch.Tensor | None = None
        self.n_seen = torch.tensor([0])

    def partial_fit(self, X: torch.Tensor) -> None:
        X = X.clone()
        n_samples, _ = X.shape
        first = self.components is None
        col_mean, col_var, total = _mean_and_var(X, self.mean, self.var, self.n_seen)
        if first:
            X -= col_mean
        else:
            batch_mean = torch.mean(X, dim=0)
            X -= batch_mean
            factor = torch.sqrt((self.n_seen.double() / total) * n_samples)
            correction = factor * (self.mean - batch_mean)
            X = torch.vstack((self.singular_values.view((-1, 1)) * self.components, X, correction))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(PCA_SEED)
            U, S, V = torch.svd_lowrank(X, q=self.q, niter=4)
        Vt = V.mH
        # svd_flip, decided on the rows of Vt
        signs = torch.sign(Vt[range(Vt.shape[0]), torch.argmax(torch.abs(Vt), dim=1)])
        Vt *= signs.view(-1, 1)
        self.n_seen = total
        self.components = Vt[: self.n_components]
        self.singular_values = S[: self.n_components]
        self.mean = col_mean
        self.var = col_var


def _mean_and_var(X, last_mean, last_variance, last_count):
    """Incremental column mean and variance in float64 (PEFT's _incremental_mean_and_var)."""
    new_count = torch.tensor([X.shape[0]])
    updated_count = last_count + new_count
    last_sum = (
        torch.zeros(X.shape[1], dtype=torch.float64)
        if last_mean is None
        else last_mean * last_count
    )
    new_sum = X.sum(dim=0, dtype=torch.float64)
    updated_mean = (last_sum + new_sum) / updated_count
    temp = X - new_sum / new_count
    correction = temp.sum(dim=0, dtype=torch.float64).square()
    temp.square_()
    new_unnormalized = temp.sum(dim=0, dtype=torch.float64) - correction / new_count
    if last_variance is None:
        return updated_mean, new_unnormalized / updated_count, updated_count
    last_over_new = last_count.double() / new_count
    updated_unnormalized = (
        last_variance * last_count
        + new_unnormalized
        + last_over_new / updated_count * (last_sum / last_over_new - new_sum).square()
    )
    return updated_mean, updated_unnormalized / updated_count, updated_count
