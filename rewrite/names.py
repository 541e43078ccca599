"""Names every layer uses for adapter tensors and the operands of a site op.

Adapter tensors live under one namespace in the adapted model's state: `adapters.<site
path>.<name>`, or `adapters.shared.<method>.<name>` for a tensor that every site of a method
shares. A site op's operands (which argument is x, W and the bias) come from `SITE_OPS` in
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
    return f"{PREFIX}{site.path}.{name}"


def logical_weight(site: Site, W: torch.Tensor) -> torch.Tensor:
    """The weight in [out, in] layout (addmm and `x @ W` sites store it as [in, out])."""
    return W.t() if site.stored_in_out else W
