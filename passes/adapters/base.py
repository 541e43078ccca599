"""The data an adapter method declares: its tensors and the context of a call.

Methods themselves are frozen dataclasses that follow the contract in `contract.py` and are
registered by name (`registry.py`); their cost formulas use `cost.py`. These small records
are what they exchange with the passes, and `site_forward` is how every caller runs one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from rewrite.sites import Site

Tensor = torch.Tensor
Params = dict[str, torch.Tensor]  # adapter tensors by name, as `params(site)` declares them


@dataclass(frozen=True)
class ParamSpec:
    """One adapter tensor: its shape, whether it trains, and whether all sites share it."""

    shape: tuple[int, ...]
    trainable: bool = True
    shared: bool = False  # stored once under adapters.shared.<name>
    dtype: torch.dtype | None = None  # None: the site's dtype (set it for index tensors)
    # a step count (an integer tensor that does not train): the pipeline adds 1 to it before
    # each training forward, outside the graph, which only reads it
    # (Pipeline.advance_step_counters)
    counter: bool = False


@dataclass(frozen=True)
class SiteContext:
    """What a forward needs besides tensors: the site, its bias, and the mode being traced."""

    site: Site
    training: bool
    bias: torch.Tensor | None = None


def site_forward(
    method: Any,
    site: Site,
    x: torch.Tensor,
    out: torch.Tensor,
    W: torch.Tensor,
    bias: torch.Tensor | None,
    params: dict[str, torch.Tensor],
    training: bool,
) -> torch.Tensor:
    """`method.forward` at `site` on the site op's whole output `out`, with its whole [out, in]
    weight `W`: a slice of a packed projection updates its own rows of `out` and passes the
    others through untouched, so they stay the base op's bit for bit."""
    if site.rows is None:
        return method.forward(x, out, W, params, SiteContext(site, training, bias))
    start, end = site.rows
    own_bias = None if bias is None else bias[start:end]
    part = method.forward(
        x, out[..., start:end], W[start:end], params, SiteContext(site, training, own_bias)
    )
    return torch.cat([out[..., :start], part, out[..., end:]], dim=-1)


def bind_plan(assignments: list) -> list:
    """Let each method class see all of its sites at once (`Method.bind_plan`): shared tensors
    (VeRA's, RandLoRA's projections) are sized by every site a method adapts, but
    `params(site)` sees one site. Each class gets its own assignments, in plan order."""
    out = list(assignments)
    groups: dict[type, list[int]] = {}
    for i, a in enumerate(out):
        groups.setdefault(type(a.method), []).append(i)
    for cls, indices in groups.items():
        bound = cls.bind_plan([out[i] for i in indices])
        if len(bound) != len(indices):
            raise ValueError(f"{cls.__name__}.bind_plan returned {len(bound)} of {len(indices)}")
        for i, a in zip(indices, bound, strict=True):
            out[i] = a
    return out


def is_int(value: object) -> bool:
    """An integer hyperparameter (YAML gives bools too, and True is an int in Python)."""
    return isinstance(value, int) and not isinstance(value, bool)
