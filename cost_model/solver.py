"""An exact solver for the budgeted placement: a multiple-choice 0/1 knapsack by dynamic programming.

Each candidate site is a group of options (rank r, integer cost c, value v); the solver picks at
most one option per group and maximises the total value subject to total cost <= capacity:

    maximise  sum_g v(g, k_g)   subject to   sum_g c(g, k_g) <= C,   k_g in options(g) or none.

The DP table best[c] is the largest value reachable with cost at most c using the groups seen
so far; each group updates it as best'[c] = max(best[c], max_k best[c - c_k] + v_k). This is the
textbook recurrence, exact for integer costs (no rounding anywhere): costs and capacity are
divided by the gcd of all option costs first, which changes no feasible set. Time and memory
are O(options x C / gcd); a capacity too fine for that raises an error that says how to
coarsen the problem.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

MAX_CELLS = 200_000_000  # groups x capacity units: ~200 MB of int8 back-pointers


@dataclass(frozen=True)
class Option:
    cost: int
    value: float
    payload: Any = None


@dataclass(frozen=True)
class Solution:
    choices: list[Option | None]  # one per group, None when the group gets nothing
    cost: int
    value: float


def solve(groups: list[list[Option]], capacity: int) -> Solution:
    """Pick at most one option per group, maximising total value within `capacity`."""
    if capacity < 0:
        raise ValueError(f"the budget must be non-negative, got {capacity}")
    for options in groups:
        if len(options) > 127:  # back-pointers are int8
            raise ValueError(f"at most 127 options per site, got {len(options)}")
        for o in options:
            if o.cost < 0 or o.value < 0 or not math.isfinite(o.value):
                raise ValueError(f"options need cost >= 0 and finite value >= 0, got {o}")
    costs = [o.cost for options in groups for o in options if o.cost <= capacity]
    unit = math.gcd(*costs) or 1  # gcd of nothing, or of zeros, is 0
    C = capacity // unit
    if (C + 1) * max(len(groups), 1) > MAX_CELLS:
        raise ValueError(
            f"the budget spans {C:,} cost units of {unit:,} over {len(groups)} sites, too fine for "
            "the exact solver; give placement.ranks with fewer ranks, restrict module_types, "
            "or narrow the rules' targets"
        )
    best = np.zeros(C + 1, dtype=np.float64)
    back = np.full((len(groups), C + 1), -1, dtype=np.int8)
    for g, options in enumerate(groups):
        new = best.copy()
        for k, o in enumerate(options):
            c = o.cost // unit
            if o.cost > capacity:
                continue
            cand = best[: C + 1 - c] + o.value
            better = cand > new[c:]
            new[c:][better] = cand[better]
            back[g, c:][better] = k
        best = new
    choices: list[Option | None] = [None] * len(groups)
    c = C
    for g in range(len(groups) - 1, -1, -1):
        k = int(back[g, c])
        if k >= 0:
            choices[g] = groups[g][k]
            c -= groups[g][k].cost // unit
    spent = sum(o.cost for o in choices if o is not None)
    value = sum(o.value for o in choices if o is not None)
    return Solution(choices, spent, value)
