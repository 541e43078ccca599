"""The data an adapter method declares: its tensors, the context of a call, and its costs.

Methods themselves are frozen dataclasses that follow the contract in `contract.py` and are
registered by name (`registry.py`). These small records are what they exchange with the
passes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import sympy
import torch

from rewrite.sites import Site

# Symbols of the cost formulas: tokens per step, and the site's dimensions and rank.
T, D_IN, D_OUT, R = sympy.symbols("T d_in d_out r", positive=True, integer=True)


@dataclass(frozen=True)
class ParamSpec:
    """One adapter tensor: its shape, whether it trains, and whether all sites share it."""

    shape: tuple[int, ...]
    trainable: bool = True
    shared: bool = False  # stored once under adapters.shared.<name>
    dtype: torch.dtype | None = None  # None: the site's dtype (set it for index tensors)


@dataclass(frozen=True)
class SiteContext:
    """What a forward needs besides tensors: the site, its bias, and the mode being traced."""

    site: Site
    training: bool
    bias: torch.Tensor | None = None


@dataclass(frozen=True)
class Cost:
    """Sympy cost formulas of a method at a site, and the values of their symbols there."""

    params: sympy.Expr
    flops_forward: sympy.Expr
    flops_backward: sympy.Expr
    activation_bytes: sympy.Expr
    symbols: dict = field(default_factory=dict)

    def evaluate(self, tokens: int = 1) -> dict[str, int]:
        env = {**self.symbols, T: tokens}
        return {
            name: int(sympy.sympify(getattr(self, name)).subs(env))
            for name in ("params", "flops_forward", "flops_backward", "activation_bytes")
        }


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


def site_symbols(site: Site, rank: int) -> dict:
    return {D_IN: site.in_features, D_OUT: site.out_features, R: rank}


def dtype_bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def is_int(value: object) -> bool:
    """An integer hyperparameter (YAML gives bools too, and True is an int in Python)."""
    return isinstance(value, int) and not isinstance(value, bool)
