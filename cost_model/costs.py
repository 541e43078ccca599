"""Costs of an adapter at a site: sympy formulas (from the method's `cost(site)`) and values.

Each method states, in the symbols T (tokens per step), d_in, d_out and r, its trainable
parameters, forward and backward FLOPs and extra activation bytes. This module evaluates them,
prints them, and measures the base model that budgets are percentages of.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import sympy
import torch

from passes.adapters.cost import Cost, T
from rewrite.program import PARAMETER, Program
from rewrite.sites import Site, SiteIndex

COST_NAMES = ("params", "flops_forward", "flops_backward", "activation_bytes")


@dataclass(frozen=True)
class CostRow:
    """One site's cost: each formula as text and its value at `tokens` tokens."""

    path: str
    method: str
    rank: int | None
    formulas: dict[str, str]
    values: dict[str, int]


def method_cost(method, site: Site) -> Cost:
    """The method's cost at `site`, checked to be sympy expressions over known symbols."""
    cost = method.cost(site)
    if not isinstance(cost, Cost):
        raise TypeError(f"{method.name}.cost must return a Cost, got {type(cost).__name__}")
    return cost


def formula(cost: Cost, name: str) -> str:
    """A cost formula as text, e.g. 'r*(d_in + d_out)'."""
    return str(sympy.simplify(sympy.sympify(getattr(cost, name))))


def cost_row(method, site: Site, tokens: int = 1) -> CostRow:
    cost = method_cost(method, site)
    return CostRow(
        path=site.path,
        method=method.name,
        rank=getattr(method, "rank", None),
        formulas={n: formula(cost, n) for n in COST_NAMES},
        values=cost.evaluate(tokens),
    )


def budget_cost(method, site: Site, kind: str) -> int:
    """What a site spends of a budget: trainable parameters, or forward FLOPs per token."""
    values = method_cost(method, site).evaluate(tokens=1)
    return values["params"] if kind == "params" else values["flops_forward"]


def base_parameters(program: Program, state: Mapping[str, torch.Tensor]) -> int:
    """Parameters of the base model the program reads, each storage counted once (tied weights)."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for slot in program.slots:
        if slot.kind != PARAMETER or slot.target not in state:
            continue
        t = state[slot.target]
        key = (
            (t.untyped_storage().data_ptr(), t.storage_offset())
            if t.device.type != "meta"
            else (id(t), 0)
        )
        if key not in seen:
            seen.add(key)
            total += t.numel()
    return total


def site_flops_per_token(site: Site) -> int:
    """Forward FLOPs of a site's base op per token (per output position for convolutions)."""
    if site.op == "embedding":
        return 0
    k = 1
    for d in site.conv.kernel if site.conv else ():
        k *= d
    groups = site.conv.groups if site.conv else 1
    return 2 * site.in_features * site.out_features * k // groups


def base_flops_per_token(sites: Iterable[Site] | SiteIndex) -> int:
    return sum(site_flops_per_token(s) for s in sites)


def total(rows: Iterable[CostRow], name: str) -> int:
    return sum(r.values[name] for r in rows)


__all__ = [
    "COST_NAMES",
    "CostRow",
    "T",
    "base_flops_per_token",
    "base_parameters",
    "budget_cost",
    "cost_row",
    "formula",
    "method_cost",
    "site_flops_per_token",
    "total",
]
