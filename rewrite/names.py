"""Names every layer uses for adapter tensors and the operands of a site op.

Adapter tensors live under one namespace in the adapted model's state: `adapters.<site
path>.<name>`, or `adapters.shared.<method>.<name>` for a tensor that every site of a method
shares; a slice `qkv_proj[0:64]` stores under `qkv_proj.rows_0_64`, see `Site.state_path`.
A site op's operands (which argument is x, W and the bias) come from `SITE_OPS` in
`rewrite.sites`; `logical_weight` turns W into the [out, in] layout every method computes in.
"""

from __future__ import annotations

from typing import Any

import torch

from rewrite.sites import Site

PREFIX = "adapters."


def param_target(method: Any, site: Site, name: str) -> str:
    """The state name of adapter tensor `name` of `method` at `site`."""
    if method.params(site)[name].shared:
        return f"{PREFIX}shared.{method.name}.{name}"
    return f"{PREFIX}{site.state_path}.{name}"


def whole_weight(site: Site, W: torch.Tensor) -> torch.Tensor:
    """The stored weight in [out, in] layout (addmm and `x @ W` sites store it as [in, out]);
    an expert site's is [experts, out, in]."""
    return W.transpose(-2, -1) if site.stored_in_out else W


def stored_weight(site: Site, W: torch.Tensor) -> torch.Tensor:
    """A weight in [out, in] layout back in the site's storage layout (`whole_weight`'s
    inverse)."""
    return W.transpose(-2, -1) if site.stored_in_out else W


def logical_weight(site: Site, W: torch.Tensor) -> torch.Tensor:
    """The weight the site multiplies by, in [out, in] layout: for a slice of a packed
    projection, its rows of the whole weight."""
    W = whole_weight(site, W)
    return W if site.rows is None else W[site.rows[0] : site.rows[1]]


def site_bias(site: Site, b: torch.Tensor) -> torch.Tensor:
    """The bias entries of the site's outputs (a slice's own rows)."""
    return b if site.rows is None else b[site.rows[0] : site.rows[1]]
