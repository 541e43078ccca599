"""EVA rank redistribution: give a rank budget to the sites whose inputs' principal
components explain the most variance.

Paischer et al., "One Initialization to Rule them All: Fine-tuning via Explained Variance
Adaptation" (2024); reference: PEFT `tuners/lora/eva.py::_get_rank_distribution`. The budget is
the sum of the sites' ranks r_s. Each site offers its first round(rho * r_s) explained-variance
ratios (eigenvalue / total variance of its centred inputs; sites that read the same input offer
the largest count of their group); the budget goes to the largest ratios over all sites, and a
site's new rank is how many of its ratios were taken. Among sites that read the same input the
first one (in graph order) is given the largest share, as PEFT does.

PEFT estimates the components with an incremental, randomised PCA and cycles the data until the
components needed are stable (cosine similarity >= tau). Here the covariance is accumulated
exactly over all calibration batches, so the ratios are exact; tau checks that the needed
components were already stable before the last batch, and names the sites where they were not.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch


@dataclass
class InputStats:
    """Running sums of a site's input rows (float64): count, sum and second moment."""

    n: int = 0
    total: torch.Tensor | None = None
    outer: torch.Tensor | None = None
    previous: torch.Tensor | None = None  # components before the last batch

    def add(self, rows: torch.Tensor) -> None:
        x = rows.detach().to(torch.float64).reshape(-1, rows.shape[-1])
        if self.total is None:
            self.total = torch.zeros(x.shape[1], dtype=torch.float64)
            self.outer = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64)
        self.n += x.shape[0]
        self.total += x.sum(0)
        self.outer += x.t() @ x

    def covariance(self) -> torch.Tensor:
        mean = self.total / self.n
        return self.outer / self.n - torch.outer(mean, mean)

    def pca(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The top-k explained-variance ratios and components (rows) of the inputs."""
        cov = self.covariance()
        values, vectors = torch.linalg.eigh(cov)
        order = values.argsort(descending=True)[:k]
        trace = cov.diagonal().sum().clamp_min(torch.finfo(torch.float64).tiny)
        return (values[order].clamp_min(0) / trace), vectors[:, order].t()

    def snapshot(self, k: int) -> None:
        """Remember the current components, to test convergence after the next batch."""
        if self.n:
            self.previous = self.pca(k)[1]


@dataclass
class EvaResult:
    ranks: dict[str, int]
    ratios: dict[str, list[float]]
    unconverged: dict[str, int] = field(default_factory=dict)  # path -> components not stable


def redistribute(
    stats: Mapping[str, InputStats],
    ranks: Mapping[str, int],
    groups: list[list[str]],
    rho: float = 2.0,
    tau: float = 0.99,
) -> EvaResult:
    """New ranks for the sites in `ranks` (their current ranks) from their input statistics.

    `groups` lists sites that read the same input, each in graph order; the first of a group
    is its representative. Ties are broken by site order (a stable sort), so it is deterministic.
    """
    order = list(ranks)
    budget = sum(ranks.values())
    max_components = {p: round(ranks[p] * rho) for p in order}
    representative = {p: p for p in order}
    for members in groups:
        members = [m for m in members if m in ranks]
        if len(members) > 1:
            top = max(max_components[m] for m in members)
            for m in members:
                max_components[m] = top
                representative[m] = members[0]
    ratios: dict[str, list[float]] = {}
    similarity: dict[str, torch.Tensor] = {}
    for p in order:
        rep = representative[p]
        k = min(max_components[p], stats[rep].total.shape[0])
        values, components = stats[rep].pca(k)
        ratios[p] = values.tolist()
        previous = stats[rep].previous
        if previous is not None and previous.shape == components.shape:
            similarity[p] = (components * previous).sum(1).abs()  # unit vectors
    # PEFT's key order: representatives first (in site order), then the other group members
    keys = [p for p in order if representative[p] == p] + [
        p for p in order if representative[p] != p
    ]
    flat_keys = [p for p in keys for _ in ratios[p]]
    flat_values = torch.tensor([v for p in keys for v in ratios[p]], dtype=torch.float64)
    taken = flat_values.argsort(descending=True, stable=True)[:budget]
    counts = {p: 0 for p in order}
    for i in taken.tolist():
        counts[flat_keys[i]] += 1
    for p in order:
        rep = representative[p]
        if rep != p and counts[rep] < counts[p]:
            counts[rep], counts[p] = counts[p], counts[rep]
    # like PEFT, only the components a site is given need to be stable
    unstable = {p: n for p, sim in similarity.items() if (n := int((sim[: counts[p]] < tau).sum()))}
    return EvaResult(counts, ratios, unstable)
