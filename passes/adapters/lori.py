"""LoRI: y = base(x) + s·(B ⊙ M)·A·dropout(x), A random and frozen, B trained (LoRI-S: B masked).

Zhang et al., "LoRI: Reducing Cross-Task Interference in Multi-Task Low-Rank Adaptation"
(arXiv 2504.07448). A (r×in) keeps its Kaiming-uniform init (a = √5) and never trains; B
(out×r) starts at zero, so the adapter starts as the identity; s = alpha/r, alpha = 2·rank by
default. LoRI-D is that plain form (`mask: null`). LoRI-S multiplies B by a 0/1 mask M taken
from a trained LoRI-D adapter: a global top-k over |B| of all its adapted layers keeping
(1 − sparsity) of the entries. With M in the forward, B's masked entries get no gradient,
which is what the reference's optimizer does. Merged: W + s·(B ⊙ M)·A.

The two stages in peftc:
    masks = extract_lori_mask(lori_d_model, sparsity=0.9, path="lori_mask.safetensors")
    spec = {"adapters": [{"method": "lori", "targets": [...], "mask": "lori_mask.safetensors"}]}
`extract_lori_mask` takes the trained LoRI-D AdaptedModel (or its adapter state: names ending
in `<site path>.lori_B`) and returns {site path: M [out, r]}, written as safetensors when
given a path; the LoRI-S spec names that file in `mask`. Compile LoRI-S with the same seed to
draw the same A; B starts at zero again (copy the LoRI-D tensors in to continue from them).
A is random, so it is saved with the checkpoint (save_frozen), and so is M, which is read
from the mask file at compile time (the file must exist wherever the spec is compiled).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from passes.adapters.base import Params, ParamSpec, SiteContext, Tensor
from passes.adapters.contract import POSITIVE_NUMBER, PROBABILITY, LowRank, Rule, hp, optional
from passes.adapters.cost import D_IN, D_OUT, Cost, R, T, dtype_bytes, site_symbols
from passes.adapters.registry import register
from rewrite.sites import Site

PATH = Rule("a path to a mask file", lambda v: isinstance(v, str) and v != "")
B_NAME = "lori_B"


def extract_lori_mask(
    adapted_or_state: Any, sparsity: float | None = None, path: str | os.PathLike | None = None
) -> dict[str, torch.Tensor]:
    """LoRI-S masks from a trained LoRI-D adapter: the (1 − sparsity) largest |B| entries over
    all its adapted layers are kept (a global top-k, ties broken by position). Returns
    {site path: bool mask [out, r]}, also written as a safetensors file when `path` is given.
    `sparsity` defaults to the adapter's own `sparsity` hyperparameter (0.9)."""
    if hasattr(adapted_or_state, "named_adapter_parameters"):
        state: Mapping[str, torch.Tensor] = adapted_or_state.named_adapter_parameters()
        if sparsity is None:
            own = {a.method.sparsity for a in adapted_or_state.plan if a.method.name == "lori"}
            sparsity = own.pop() if len(own) == 1 else None
    else:
        state = adapted_or_state
    sparsity = LoRI.sparsity if sparsity is None else sparsity
    if not PROBABILITY.ok(sparsity):
        raise ValueError(f"extract_lori_mask: sparsity must be in [0, 1), got {sparsity!r}")
    Bs = {}
    for key, value in state.items():
        if key == B_NAME or key.endswith("." + B_NAME):
            site = key[: -len(B_NAME) - 1]
            for prefix in ("adapters.", "base_model.model."):  # peftc's state, a checkpoint's
                site = site.removeprefix(prefix)
            Bs[site] = value.detach().float().abs()
    if not Bs:
        raise ValueError(
            "extract_lori_mask: no lori_B tensors found; pass the trained LoRI-D AdaptedModel "
            "or its adapter state (names ending in '<site path>.lori_B')"
        )
    scores = torch.cat([b.flatten() for b in Bs.values()])
    keep = max(1, round(scores.numel() * (1.0 - sparsity)))
    flat = torch.zeros(scores.numel(), dtype=torch.bool)
    flat[torch.topk(scores, keep, sorted=False).indices] = True
    masks, start = {}, 0
    for site, b in Bs.items():
        masks[site] = flat[start : start + b.numel()].view(b.shape).clone()
        start += b.numel()
    if path is not None:
        from safetensors.torch import save_file

        save_file(masks, os.fspath(path))
    return masks


def load_lori_mask(path: str, site: Site) -> torch.Tensor:
    from safetensors.torch import load_file

    if not os.path.isfile(path):
        raise ValueError(
            f"lori: mask file {path!r} not found; extract one from a trained LoRI-D adapter "
            "with passes.adapters.lori.extract_lori_mask(model, sparsity, path)"
        )
    masks = load_file(path)
    if site.path not in masks:
        raise ValueError(
            f"lori: mask file {path!r} has no mask for {site.path} (it has "
            f"{sorted(masks)[:4]}...); extract it from a LoRI-D adapter of the same targets"
        )
    return masks[site.path]


@register("lori")
class LoRI(LowRank):
    alpha: float | None = hp(None, optional(POSITIVE_NUMBER, "alpha = 2·rank"))
    mask: str | None = hp(None, optional(PATH, "LoRI-D, no mask"), hint="LoRI-S: a mask file")
    sparsity: float = hp(0.9, PROBABILITY, "the fraction of B's entries a mask extraction drops")

    supported_ops: ClassVar[tuple[str, ...]] = ("linear", "addmm")
    save_frozen: ClassVar[bool] = True  # A is random: the checkpoint carries it

    @property
    def scaling(self) -> float:
        alpha = 2 * self.rank if self.alpha is None else self.alpha
        return alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)

    def params(self, site: Site) -> dict[str, ParamSpec]:
        r, out = self.rank, site.out_features
        specs = {
            "lori_A": ParamSpec((r, site.in_features), trainable=False),
            "lori_B": ParamSpec((out, r)),
        }
        if self.mask is not None:
            specs["lori_mask"] = ParamSpec((out, r), trainable=False)
        return specs

    def init(self, site: Site, W: Tensor, calib: object, generator: torch.Generator) -> Params:
        A = torch.empty(self.rank, site.in_features, dtype=torch.float32)
        torch.nn.init.kaiming_uniform_(A, a=math.sqrt(5), generator=generator)
        values = {
            "lori_A": A.to(W.dtype),
            "lori_B": torch.zeros(site.out_features, self.rank, dtype=W.dtype),
        }
        if self.mask is not None:
            M = load_lori_mask(self.mask, site)
            if tuple(M.shape) != (site.out_features, self.rank):
                raise ValueError(
                    f"lori: the mask for {site.path} has shape {tuple(M.shape)}, but rank "
                    f"{self.rank} needs ({site.out_features}, {self.rank}); use the LoRI-D rank"
                )
            values["lori_mask"] = M.to(W.dtype)
        return values

    def _B(self, p: Params) -> Tensor:
        return p["lori_B"] if self.mask is None else p["lori_B"] * p["lori_mask"]

    def forward(
        self, x: Tensor, base_out: Tensor, W: Tensor, p: Params, ctx: SiteContext
    ) -> Tensor:
        h = F.dropout(x, self.dropout, ctx.training) if self.dropout > 0 else x
        return base_out + F.linear(F.linear(h, p["lori_A"]), self._B(p)) * self.scaling

    def merged_weight(self, site: Site, W: Tensor, p: Params) -> Tensor:
        """W + s·(B ⊙ M)·A in [out, in] layout."""
        return W + (self._B(p) @ p["lori_A"]) * self.scaling

    def cost(self, site: Site) -> Cost:
        # x·Aᵀ (r·in), ·(B ⊙ M)ᵀ (r·out) per token, scale-and-add; the mask costs out·r once
        flops_forward = 2 * T * R * (D_IN + D_OUT) + 2 * T * D_OUT
        flops_forward += D_OUT * R if self.mask is not None else 0
        return Cost(
            params=D_OUT * R,
            flops_forward=flops_forward,
            flops_backward=2 * flops_forward,
            activation_bytes=T * (R + (D_IN if self.dropout > 0 else 0)) * dtype_bytes(site.dtype),
            symbols=site_symbols(site, self.rank),
        )
