"""PLoP's normalised feature norm (NFN): how aligned each site's weight is with its inputs.

Hayou, Ghosh, Yu, "PLoP: Precise LoRA Placement" (ICLR 2026), reference code
soufiane001/plop `src/metrics.py:calculate_nfn_scores`. For a site with weight W and input
tokens z_t (padding masked out):

    ẑ_t = z_t / ‖z_t‖,   Ŵ = W / sqrt(mean(W²)),
    NFN = mean_t ‖Ŵ ẑ_t‖ / mean_t ‖Ŵ g_t‖,   g_t a fresh unit Gaussian vector per token.

NFN ≈ 1: the weight is blind to the data; NFN > 1: it is aligned with it. PLoP adapts the
module types with the lowest mean NFN. One NFN is computed per site call and batch, and the
site's score is their mean. Inputs come from interpreting the traced graph (no module hooks).
Each site draws its random baseline from its own generator, seeded from (seed, path), so a
site's score does not depend on which other sites are scored.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch

from rewrite.capture import capture_site_inputs
from rewrite.program import Program
from rewrite.sites import Site, SiteIndex


@dataclass
class NFNScores:
    """Per-site NFN, per-type mean NFN, and what could not be scored (path -> why)."""

    site_scores: dict[str, float]
    type_scores: dict[str, float]
    skipped: dict[str, str] = field(default_factory=dict)
    batches: int = 0
    seed: int = 0


def unscored_reason(site: Site) -> str | None:
    """Why a site gets no NFN, or None when it gets one."""
    if site.op == "embedding":
        return "embeddings are lookups, not maps of token features; PLoP does not score them"
    if site.conv is not None and (any(k != 1 for k in site.conv.kernel) or site.conv.groups != 1):
        # the captured rows are per-position channel vectors; a k>1 kernel reads patches
        return "NFN is defined for pointwise maps; this convolution reads patches (kernel > 1)"
    return None


def site_generator(seed: int, path: str) -> torch.Generator:
    """The random-baseline generator of one site: fixed by the seed and the site path."""
    return torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(path.encode())) % 2**62)


def normalized_weight(site: Site, W: torch.Tensor) -> torch.Tensor:
    """The [out, in] weight divided by its RMS, in float32."""
    W = W.detach().float()
    if site.stored_in_out:
        W = W.t()
    W = W.reshape(W.shape[0], -1)
    return W / W.pow(2).mean().sqrt().clamp_min(torch.finfo(torch.float32).tiny)


def nfn(W_hat: torch.Tensor, rows: torch.Tensor, generator: torch.Generator) -> float | None:
    """NFN of one batch: rows are [tokens, in] inputs; None when no token has a non-zero norm."""
    z = rows.detach().float().reshape(-1, W_hat.shape[1])
    norms = z.norm(dim=1)
    z = z[norms > 0] / norms[norms > 0, None]
    if z.shape[0] == 0:
        return None
    g = torch.randn(z.shape, generator=generator)
    g = g / g.norm(dim=1, keepdim=True)
    actual = (z @ W_hat.t()).norm(dim=1).mean()
    random = (g @ W_hat.t()).norm(dim=1).mean()
    return float(actual / random)


def type_means(site_scores: Mapping[str, float], sites: SiteIndex) -> dict[str, float]:
    """Arithmetic mean of the site scores of each module type, sorted by type name."""
    by_type: dict[str, list[float]] = {}
    for path, score in site_scores.items():
        by_type.setdefault(sites[path].module_type, []).append(score)
    return {t: sum(v) / len(v) for t, v in sorted(by_type.items())}


def score_sites(
    program: Program,
    state: Mapping[str, torch.Tensor],
    sites: SiteIndex,
    batches: Iterable[Mapping[str, torch.Tensor]],
    paths: Iterable[str] | None = None,
    seed: int = 0,
) -> NFNScores:
    """NFN of every scorable site (or of `paths`) over `batches` (dicts of named inputs).

    Run it on an eval-mode program so that dropout does not perturb the inputs.
    """
    wanted = [s.path for s in sites] if paths is None else list(paths)
    skipped = {p: r for p in wanted if (r := unscored_reason(sites[p])) is not None}
    scored = [p for p in wanted if p not in skipped]
    weights = {p: normalized_weight(sites[p], state[sites[p].weight]) for p in scored}
    generators = {p: site_generator(seed, p) for p in scored}
    values: dict[str, list[float]] = {p: [] for p in scored}

    def collect(path: str, rows: torch.Tensor) -> None:
        value = nfn(weights[path], rows, generators[path])
        if value is not None:
            values[path].append(value)

    count = capture_site_inputs(
        program, state, sites, scored, batches, collect, desc="NFN scores (PLoP)"
    )
    site_scores = {}
    for path in scored:
        if values[path]:
            site_scores[path] = sum(values[path]) / len(values[path])
        else:
            skipped[path] = "every calibration token reaching it was padding or all-zero"
    return NFNScores(site_scores, type_means(site_scores, sites), skipped, count, seed)
