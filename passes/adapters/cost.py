"""The terms of a method's cost formulas: sympy symbols for tokens per step and a site's
dimensions and rank, and the `Cost` record that `Method.cost(site)` returns (read by
cost_model for placement budgets and the plan table)."""

from __future__ import annotations

from dataclasses import dataclass, field

import sympy
import torch

from rewrite.sites import Site

# Symbols of the cost formulas: tokens per step, and the site's dimensions and rank.
T, D_IN, D_OUT, R = sympy.symbols("T d_in d_out r", positive=True, integer=True)


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


def site_symbols(site: Site, rank: int) -> dict:
    return {D_IN: site.in_features, D_OUT: site.out_features, R: rank}


def dtype_bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()
