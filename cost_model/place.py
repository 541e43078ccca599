"""Placement: turn a spec, the program's sites and calibration data into a Plan.

Strategies (the spec's `placement:` section, see `placement_spec.py`):
- manual (or no placement section): the rules are resolved as written (first match wins).
- all: every candidate site, at the rule's hyperparameters.
- plop: PLoP NFN scores; `module_types: k` adapts the k candidate types with the lowest mean
  NFN; a `budget` chooses sites and ranks with the exact knapsack solver (`solver.py`),
  maximising  sum_s (1 / NFN_s) * log2(1 + r_s)  over the chosen sites s and ranks r_s, with
  the costs from the methods' sympy formulas. Lower NFN means more benefit; the log makes
  each extra rank worth less, so the budget is spread over sites instead of one huge rank.
- eva: EVA rank redistribution of the rules' rank budget (`eva_ranks.py`).

Candidates are the sites of the repeated blocks (a layer index in the path, `Site.layer`) that
the rules select (rules without targets select every one), minus embeddings. PLoP compares the
module types of the blocks; a module outside them (a pooler, a classifier, a patch embedding)
is one site that the loss may never read (a mean-pooled embedding never reads BERT's pooler),
so it is a candidate only when a rule names it: a `targets` or `types` entry with no glob
characters that is its path or a dotted suffix of it (`pooler.dense`; `dense` names every
`*.dense`, the pooler's included). Wildcard targets (`*.dense`, `*`) and rules without
targets never make it a candidate. The output head (`lm_head`) is scored but adapted only
when a rule's target or type mentions it (`lm_head`, `*lm_head`).
When the solver or EVA changes a site's rank, a method with `alpha` keeps alpha/rank as the
rule set it (PEFT's EVA `adjust_scaling_factors`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

import torch

from cost_model.costs import base_flops_per_token, base_parameters, budget_cost
from cost_model.eva_ranks import InputStats, redistribute
from cost_model.nfn import NFNScores, score_sites, unscored_reason
from cost_model.placement_spec import DEFAULT_RANKS, Placement, parse_placement
from cost_model.plan import Plan
from cost_model.solver import Option, solve
from passes.adapters.base import bind_plan
from rewrite.capture import capture_site_inputs
from rewrite.program import Program
from rewrite.sites import Site, SiteIndex, find_sites, is_output_head, type_matches
from rewrite.spec import AdaptationSpec, Assignment, SpecError, path_matches, resolve


def _names_head(spec: AdaptationSpec, site: Site) -> bool:
    name = site.path.rsplit(".", 1)[-1]
    return any(name in t for rule in spec.adapters for t in (*rule.targets, *rule.types))


def names_site(spec: AdaptationSpec, site: Site) -> bool:
    """Whether a rule names this site: a target or type with no glob characters that is its
    path or a dotted suffix of it. A wildcard says "whatever matches", not "this module", so
    it does not count (see the module docstring)."""
    for rule in spec.adapters:
        if any(not _is_glob(t) and path_matches(site.path, t) for t in rule.targets):
            return True
        if any(type_matches(site.module_type, t) for t in rule.types if not _is_glob(t)):
            return True
    return False


def _is_glob(pattern: str) -> bool:
    return any(c in pattern for c in "*?[")


def outside_blocks_reason(site: Site) -> str:
    return (
        "not in a repeated block (no layer index): placement compares the blocks' module "
        "types, and the loss may never read a module outside them; name it in targets "
        f"(targets: [{site.path}]) to adapt it"
    )


def _excluded(spec: AdaptationSpec, site: Site, strategy: str) -> str | None:
    """Why a site can never be a candidate of this placement, or None."""
    if site.op == "embedding":
        return "embeddings are not placement candidates (give a manual rule to adapt them)"
    if is_output_head(site):
        if not _names_head(spec, site):
            return "the output head is scored but adapted only when a rule names it (targets: [lm_head])"
    elif site.layer is None and not names_site(spec, site):
        return outside_blocks_reason(site)
    if strategy == "plop" and (why := unscored_reason(site)) is not None:
        return why
    if strategy == "eva" and site.op not in ("linear", "addmm"):
        return "EVA redistributes ranks over linear layers only (as PEFT does)"
    return None


def _candidates(
    spec: AdaptationSpec, sites: SiteIndex, methods: Mapping[str, type], strategy: str
) -> tuple[list[Assignment], dict[str, str]]:
    """First-match assignments over the candidate sites, and why the others are excluded."""
    excluded = {s.path: why for s in sites if (why := _excluded(spec, s, strategy)) is not None}
    for rule in spec.adapters:
        if not (rule.targets or rule.types or rule.layers is not None):
            continue
        picked = [s for s in sites if rule.selects(s)]
        if picked and all(s.path in excluded for s in picked):
            raise SpecError(
                f"{rule.describe()} selects only sites that placement {strategy} cannot choose "
                f"({picked[0].path}: {excluded[picked[0].path]}); drop the placement section "
                "to adapt them as written"
            )
    allowed = {s.path for s in sites if s.path not in excluded}
    if not allowed and len(sites):
        first = next(iter(sites))
        raise SpecError(
            f"placement {strategy} has no candidate site in this model ({first.path}: "
            f"{excluded[first.path]}); name the modules to adapt in targets, or drop the "
            "placement section"
        )
    return resolve(spec, sites, methods, candidates=allowed), excluded


def _shares_tensors(a: Assignment) -> bool:
    return any(spec.shared for spec in a.method.params(a.site).values())


def _with_rank(a: Assignment, rank: int, adjust: bool = True) -> Assignment:
    method = a.method
    if rank != method.rank:
        changes: dict = {"rank": rank}
        if adjust and hasattr(method, "alpha"):
            changes["alpha"] = method.alpha * rank / method.rank
        method = dataclasses.replace(method, **changes)
    return Assignment(a.site, method, a.rule)


def _needs_rank(a: Assignment, strategy: str) -> None:
    if getattr(a.method, "rank", None) is None or not any(
        f.name == "rank" for f in dataclasses.fields(a.method)
    ):
        raise SpecError(
            f"placement {strategy} sets ranks, but adapters[{a.rule}] ({a.method.name}) has no "
            "rank; use a rank-based method (lora, dora, ...) or strategy: all/manual"
        )


def _base_sizes(program: Program | None, state, sites: SiteIndex) -> tuple[int | None, int]:
    params = base_parameters(program, state) if program is not None and state is not None else None
    return params, base_flops_per_token(sites)


def place(
    spec: AdaptationSpec,
    sites: SiteIndex,
    methods: Mapping[str, type],
    program: Program | None = None,
    state: Mapping[str, torch.Tensor] | None = None,
    calibration: Sequence[Mapping[str, torch.Tensor]] | None = None,
) -> Plan:
    """Plan the adapters. `program` is an eval-mode trace of the model (its graph is read for
    data-driven strategies), `state` its parameters and buffers by name, and `calibration` a
    list of input dicts (`rewrite.trace.bind_inputs`), needed by plop and eva."""
    placement = placement_of(spec)
    base_params, base_flops = _base_sizes(program, state, sites)
    if placement is None or placement.strategy == "manual":
        assignments = resolve(spec, sites, methods)
        reasons = {a.site.path: f"matched adapters[{a.rule}]" for a in assignments}
        return Plan(
            bind_plan(assignments),
            "manual",
            reasons=reasons,
            base_params=base_params,
            base_flops_per_token=base_flops,
        )
    strategy = placement.strategy
    have_data = calibration is not None and program is not None and state is not None
    if placement.needs_calibration and not have_data:
        raise SpecError(
            f"placement strategy {strategy} needs calibration data: call "
            "peftc.compile(model, spec, example_inputs, calibration=batches) with a few "
            "batches of real inputs (or use strategy: all / manual)"
        )
    if have_data and program.training:
        raise ValueError("placement scores need an eval-mode program (dropout off)")
    candidates, excluded = _candidates(spec, sites, methods, strategy)
    plan = Plan(
        [],
        strategy,
        base_params=base_params,
        base_flops_per_token=base_flops,
    )
    for path, why in excluded.items():
        plan.reasons[path] = f"not a candidate: {why}"
    taken = {a.path for a in candidates}
    for s in sites:
        if s.path not in excluded and s.path not in taken:
            plan.reasons[s.path] = "not selected: no rule's targets / types / layers select it"
    scores = None
    stats: dict[str, InputStats] = {}
    if have_data:
        scores, stats = _measure(program, state, calibration, spec, placement, candidates)
        plan.site_scores = scores.site_scores
        plan.type_scores = scores.type_scores
        plan.unscored = scores.skipped
    if strategy == "all":
        plan.assignments = candidates
        for a in candidates:
            plan.reasons[a.path] = f"strategy all: matched adapters[{a.rule}]"
        _type_reasons_all(plan, candidates)
    elif strategy == "plop":
        _plop(plan, placement, candidates, scores)
    else:
        _eva(plan, placement, candidates, stats, sites, len(calibration))
    for t, why in _excluded_types(sites, excluded).items():
        if t in plan.type_scores:  # scored types are rows of the type table: say why not
            plan.type_reasons[t] = f"not a candidate: {why}"
    for t in plan.type_scores:
        plan.type_reasons.setdefault(
            t, "no candidate site of this type (not selected, or excluded)"
        )
    plan.assignments = bind_plan(plan.assignments)  # size shared tensors by the chosen sites
    return plan


def _excluded_types(sites: SiteIndex, excluded: Mapping[str, str]) -> dict[str, str]:
    """The module types whose every site is excluded for one same reason, with the reason."""
    why: dict[str, set[str]] = {}
    for s in sites:
        why.setdefault(s.module_type, set()).add(excluded.get(s.path, ""))
    return {t: next(iter(w)) for t, w in why.items() if len(w) == 1 and "" not in w}


def _measure(
    program: Program,
    state,
    calibration,
    spec: AdaptationSpec,
    placement: Placement,
    candidates: list[Assignment],
) -> tuple[NFNScores, dict[str, InputStats]]:
    """NFN of every scorable site; for eva also the candidates' input covariance."""
    scoring_sites = find_sites(program)
    scores = score_sites(program, state, scoring_sites, calibration, seed=spec.seed)
    stats: dict[str, InputStats] = {}
    if placement.strategy == "eva":
        paths = [a.path for a in candidates]
        stats = {p: InputStats() for p in paths}
        batches = list(calibration)

        def add(path: str, rows: torch.Tensor) -> None:
            stats[path].add(rows)

        if len(batches) > 1:
            capture_site_inputs(
                program, state, scoring_sites, paths, batches[:-1], add, desc="EVA statistics"
            )
            for a in candidates:
                stats[a.path].snapshot(round(a.method.rank * placement.rho))
        capture_site_inputs(
            program, state, scoring_sites, paths, batches[-1:], add, desc="EVA statistics"
        )
    return scores, stats


def _ordinal(n: int) -> str:
    return f"{n}{'tsnrhtdd'[(n // 10 % 10 != 1) * (n % 10 < 4) * n % 10 :: 4]}"


def _type_reasons_all(plan: Plan, chosen: list[Assignment]) -> None:
    types = {a.site.module_type for a in chosen}
    for t in types:
        plan.type_reasons[t] = "strategy all: every candidate site is adapted"
    for t in plan.type_scores:
        plan.type_reasons.setdefault(t, "no candidate site of this type")


def _plop(
    plan: Plan, placement: Placement, candidates: list[Assignment], scores: NFNScores | None
) -> None:
    assert scores is not None  # place() checked the calibration
    scored = [a for a in candidates if a.path in scores.site_scores]
    for a in candidates:
        if a.path not in scores.site_scores:
            plan.reasons[a.path] = f"not scored: {scores.skipped.get(a.path, 'no NFN')}"
    cand_types = sorted(
        {a.site.module_type for a in scored}, key=lambda t: (scores.type_scores[t], t)
    )
    for t in scores.type_scores:
        if t not in cand_types:
            plan.type_reasons[t] = "no candidate site of this type (not selected, or excluded)"
    if placement.module_types is not None:
        keep = set(cand_types[: placement.module_types])
        n = len(cand_types)
        for i, t in enumerate(cand_types):
            where = f"mean NFN {scores.type_scores[t]:.4f} is the {_ordinal(i + 1)} lowest of {n} candidate types"
            plan.type_reasons[t] = (
                f"chosen: {where}"
                if t in keep
                else f"not chosen: {where}; module_types: {placement.module_types} keeps the lowest"
            )
        pool = [a for a in scored if a.site.module_type in keep]
        for a in scored:
            if a.site.module_type not in keep:
                plan.reasons[a.path] = (
                    "not chosen: its module type's mean NFN is not among the lowest"
                )
    else:
        pool = scored
        for t in cand_types:
            plan.type_reasons[t] = f"candidate: mean NFN {scores.type_scores[t]:.4f}"
    if placement.budget is None:
        plan.assignments = pool
        for a in pool:
            plan.reasons[a.path] = (
                f"chosen: type {a.site.module_type} (NFN {scores.site_scores[a.path]:.4f})"
            )
        return
    _spend(plan, placement, pool, scores)


def _spend(plan: Plan, placement: Placement, pool: list[Assignment], scores: NFNScores) -> None:
    budget = placement.budget
    total = plan.base_params if budget.kind == "params" else plan.base_flops_per_token
    if budget.percent and not total:
        raise SpecError(f"a percentage {budget.kind} budget needs the base model's size")
    limit = budget.limit(total or 0)
    plan.budget, plan.budget_kind, plan.budget_limit = budget.describe(), budget.kind, limit
    groups = []
    for a in pool:
        _needs_rank(a, "plop with a budget")
        benefit = 1.0 / max(scores.site_scores[a.path], 1e-12)
        ranks = placement.ranks or tuple(sorted({*DEFAULT_RANKS, a.method.rank}))
        if _shares_tensors(a):  # one shared tensor (VeRA's A/B) fixes a single rank
            ranks = (a.method.rank,)
        options = []
        for r in ranks:
            try:
                option = _with_rank(a, r)
            except ValueError:
                continue
            if option.method.check(a.site) is not None:
                continue
            cost = budget_cost(option.method, a.site, budget.kind)
            options.append(Option(cost, benefit * math.log2(1 + r), option))
        groups.append(options)
    solution = solve(groups, limit)
    for a, choice in zip(pool, solution.choices):
        nfn = scores.site_scores[a.path]
        if choice is None:
            plan.reasons[a.path] = (
                f"not chosen: NFN {nfn:.4f}; the budget buys more benefit (1/NFN x log2(1+r)) "
                "at other sites"
            )
            continue
        plan.assignments.append(choice.payload)
        plan.reasons[a.path] = (
            f"chosen: rank {choice.payload.rank} for {choice.cost:,} {budget.kind} "
            f"(NFN {nfn:.4f}, benefit {choice.value:.3f})"
        )
    for t in {a.site.module_type for a in pool}:
        n = sum(a.site.module_type == t for a in plan.assignments)
        plan.type_reasons[t] = (
            f"chosen: the budget buys ranks at {n} of its sites (mean NFN {scores.type_scores[t]:.4f})"
            if n
            else f"not chosen: the budget buys more benefit elsewhere (mean NFN {scores.type_scores[t]:.4f})"
        )
    plan.notes.append(
        f"budget {budget.describe()} = {limit:,} {budget.kind}; spent {solution.cost:,} "
        f"({100 * solution.cost / max(limit, 1):.1f}%) by the exact knapsack solver"
    )


def _eva(
    plan: Plan,
    placement: Placement,
    candidates: list[Assignment],
    stats: dict[str, InputStats],
    sites: SiteIndex,
    n_batches: int,
) -> None:
    for a in candidates:
        _needs_rank(a, "eva")
        if _shares_tensors(a):
            raise SpecError(
                f"placement eva gives each site its own rank, but {a.method.name} shares one "
                "tensor across sites at a single rank; use strategy plop or all"
            )
    ranks = {a.path: a.method.rank for a in candidates}
    order = {s.path: i for i, s in enumerate(sites)}
    groups = [
        sorted(g, key=order.__getitem__) for g in {sites[p].group for p in ranks} if len(g) > 1
    ]
    result = redistribute(stats, ranks, groups, placement.rho, placement.tau)
    budget = sum(ranks.values())
    plan.budget, plan.budget_kind, plan.budget_limit = f"rank {budget}", "rank", budget
    types: dict[str, int] = {}
    for a in candidates:
        r = result.ranks[a.path]
        types[a.site.module_type] = types.get(a.site.module_type, 0) + r
        if r == 0:
            plan.reasons[a.path] = "not chosen: EVA gave it rank 0 (its inputs' variance ranks low)"
            continue
        plan.assignments.append(_with_rank(a, r, placement.adjust_scaling_factors))
        top = result.ratios[a.path][0] if result.ratios[a.path] else 0.0
        plan.reasons[a.path] = (
            f"chosen: EVA rank {r} (was {a.method.rank}); first component explains {top:.1%}"
        )
    for t, r in types.items():
        plan.type_reasons[t] = (
            f"chosen: EVA gave its sites {r} ranks in all"
            if r
            else "not chosen: EVA gave it rank 0"
        )
    if n_batches < 2:
        plan.notes.append("one calibration batch: EVA component convergence (tau) not checked")
    if result.unconverged:
        plan.notes.append(
            f"EVA components not yet stable at tau={placement.tau} (cosine similarity before "
            f"and after the last batch) at {len(result.unconverged)} sites, e.g. "
            f"{next(iter(result.unconverged))}; add calibration batches"
        )


def placement_of(spec: AdaptationSpec) -> Placement | None:
    """The spec's typed placement section. A spec loaded with `parse_placement` (as the compile
    pipeline loads it) carries it already; a spec loaded without it (a direct caller's
    `load_spec(source, methods)`) still holds the mapping as written, parsed here."""
    if spec.placement is None or isinstance(spec.placement, Placement):
        return spec.placement
    return parse_placement(spec.placement)


def wants_scores(placement: Placement | None) -> bool:
    """Whether this placement reads calibration data through an eval-mode program."""
    return placement is not None and placement.strategy != "manual"
