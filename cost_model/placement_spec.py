"""The spec's `placement:` section, validated: strategy, module_types, budget, ranks, rho, tau.

    placement:
      strategy: plop            # plop | eva | all | manual
      module_types: 3           # plop: adapt the k module types with the lowest mean NFN
      budget: {params: "0.5%"}  # plop: or {params: 2_000_000}, {flops: "5%"}, {flops: 1e6}
      ranks: [1, 2, 4, 8, 16]   # plop + budget: the ranks the solver may give a site
      rho: 2                    # eva: each site may take up to round(rho * rank) components
      tau: 0.99                 # eva: cosine similarity at which components count as converged

A placement chooses among the sites of the repeated blocks (a layer index in the module path):
PLoP ranks the blocks' module types. A module outside them (a pooler, a classifier, a patch
embedding) is a candidate only when a rule names it literally, `targets: [pooler.dense]` (no
glob characters; `*.dense` does not name it); see `place.py`.

A params budget is a count of trainable parameters, or a percentage of the base model's
parameters. A flops budget is the adapters' extra forward FLOPs per token, or a percentage of
the base model's forward FLOPs per token through its sites (2·d_in·d_out each, embeddings
excluded).
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from rewrite.spec import SpecError

STRATEGIES = ("plop", "eva", "all", "manual")
KEYS = ("strategy", "module_types", "budget", "ranks", "rho", "tau", "adjust_scaling_factors")
BUDGET_KINDS = ("params", "flops")
DEFAULT_MODULE_TYPES = 3  # PLoP's published rule
DEFAULT_RANKS = (1, 2, 4, 8, 16, 32, 64)
_SUFFIX = {"k": 1e3, "m": 1e6, "g": 1e9, "b": 1e9}


@dataclass(frozen=True)
class Budget:
    kind: str  # params | flops
    amount: float
    percent: bool

    def limit(self, total: int) -> int:
        """The budget as an absolute integer, given the base model's total for a percentage."""
        return int(total * self.amount / 100) if self.percent else int(self.amount)

    def describe(self) -> str:
        amount = f"{self.amount:g}%" if self.percent else f"{int(self.amount):,}"
        return f"{self.kind} {amount}"


@dataclass(frozen=True)
class Placement:
    strategy: str = "manual"
    module_types: int | None = None
    budget: Budget | None = None
    ranks: tuple[int, ...] | None = None
    rho: float = 2.0
    tau: float = 0.99
    adjust_scaling_factors: bool = True

    @property
    def needs_calibration(self) -> bool:
        return self.strategy in ("plop", "eva")


def _did_you_mean(word: str, allowed) -> str:
    close = difflib.get_close_matches(str(word), list(allowed), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else f"; allowed: {', '.join(allowed)}"


def _amount(value: Any, kind: str) -> tuple[float, bool]:
    where = f"placement.budget.{kind}"
    if isinstance(value, bool):
        raise SpecError(f"{where} must be a number or a percentage like '0.5%', got {value!r}")
    if isinstance(value, int | float):
        amount, percent = float(value), False
    elif isinstance(value, str):
        text = value.strip().replace("_", "").replace(",", "").lower()
        percent = text.endswith("%")
        text = text.rstrip("%").strip()
        scale = 1.0
        if not percent and text and text[-1] in _SUFFIX:
            scale, text = _SUFFIX[text[-1]], text[:-1]
        if not re.fullmatch(r"[0-9]*\.?[0-9]+(e[+-]?[0-9]+)?", text):
            raise SpecError(
                f"{where} {value!r} is not a number; write it like 2_000_000, '2M' or '0.5%'"
            )
        amount = float(text) * scale
    else:
        raise SpecError(f"{where} must be a number or a percentage like '0.5%', got {value!r}")
    if amount <= 0 or (percent and amount > 100):
        raise SpecError(f"{where} must be positive (and at most 100%), got {value!r}")
    if not percent and amount < 1:
        raise SpecError(
            f"{where} {value!r} is a fraction; write a percentage like '{amount * 100:g}%' "
            "or an absolute count"
        )
    return amount, percent


def _budget(raw: Any) -> Budget:
    if not isinstance(raw, Mapping) or len(raw) != 1:
        raise SpecError(
            "placement.budget is a mapping with one key, params or flops: "
            "e.g. budget: {params: '0.5%'} or budget: {flops: '5%'}"
        )
    ((kind, value),) = raw.items()
    if kind not in BUDGET_KINDS:
        raise SpecError(
            f"placement.budget has unknown key {kind!r}{_did_you_mean(kind, BUDGET_KINDS)}"
        )
    return Budget(kind, *_amount(value, kind))


def _positive_int(value: Any, where: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise SpecError(f"{where} must be a positive integer, got {value!r}")
    return value


def parse_placement(raw: Mapping | Placement | None) -> Placement | None:
    """Validate a spec's raw `placement:` mapping; None when the spec has no such section.

    This is the parser `rewrite.spec.load_spec(..., parse_placement=parse_placement)` runs
    once, so the loaded spec carries the typed section; a Placement passes through unchanged
    (load_spec relies on that for a spec that is already loaded)."""
    if raw is None:
        return None
    if isinstance(raw, Placement):
        return raw
    if not isinstance(raw, Mapping):
        raise SpecError(f"placement must be a mapping, got {raw!r}")
    for key in raw:
        if key not in KEYS:
            raise SpecError(f"unknown placement key {key!r}{_did_you_mean(key, KEYS)}")
    strategy = raw.get("strategy", "manual")
    if strategy not in STRATEGIES:
        raise SpecError(
            f"unknown placement strategy {strategy!r}{_did_you_mean(strategy, STRATEGIES)}"
        )
    given = set(raw) - {"strategy"}
    allowed = {
        "plop": {"module_types", "budget", "ranks"},
        "eva": {"rho", "tau", "adjust_scaling_factors"},
        "all": set(),
        "manual": set(),
    }[strategy]
    extra = sorted(given - allowed)
    if extra:
        hint = {
            "eva": "eva redistributes the rules' own ranks (their sum is the rank budget)",
            "all": "all adapts every candidate site; use strategy: plop to choose by NFN",
            "manual": "manual resolves the rules as written; use strategy: plop to choose",
            "plop": "rho and tau belong to strategy: eva",
        }[strategy]
        raise SpecError(f"placement strategy {strategy} takes no {', '.join(extra)}: {hint}")
    module_types = raw.get("module_types")
    if module_types is not None:
        module_types = _positive_int(module_types, "placement.module_types")
    budget = _budget(raw["budget"]) if "budget" in raw else None
    ranks = None
    if "ranks" in raw:
        if budget is None:
            raise SpecError("placement.ranks lists the ranks a budget may buy; add a budget")
        values = raw["ranks"] if isinstance(raw["ranks"], list | tuple) else [raw["ranks"]]
        ranks = tuple(sorted({_positive_int(r, "placement.ranks[]") for r in values}))
    if strategy == "plop" and module_types is None and budget is None:
        module_types = DEFAULT_MODULE_TYPES
    rho = raw.get("rho", 2.0)
    if isinstance(rho, bool) or not isinstance(rho, int | float) or rho < 1:
        raise SpecError(f"placement.rho must be a number >= 1 (PEFT's EVA rule), got {rho!r}")
    tau = raw.get("tau", 0.99)
    if isinstance(tau, bool) or not isinstance(tau, int | float) or not 0 < tau <= 1:
        raise SpecError(f"placement.tau must be in (0, 1], got {tau!r}")
    adjust = raw.get("adjust_scaling_factors", True)
    if not isinstance(adjust, bool):
        raise SpecError(f"placement.adjust_scaling_factors must be true or false, got {adjust!r}")
    return Placement(strategy, module_types, budget, ranks, float(rho), float(tau), adjust)
