"""Placement: turn a spec and the program's sites into a Plan.

Without a `placement:` section the spec's rules are resolved as written (first match wins).
"""

from __future__ import annotations

from collections.abc import Mapping

from cost_model.plan import Plan
from rewrite.sites import SiteIndex
from rewrite.spec import AdaptationSpec, SpecError, resolve


def place(spec: AdaptationSpec, sites: SiteIndex, methods: Mapping[str, type]) -> Plan:
    if spec.placement is not None:
        strategy = spec.placement.get("strategy", "manual")
        if strategy != "manual":
            raise SpecError(
                f"placement strategy {strategy!r} is not available in this version; "
                "use strategy: manual, or drop the placement section and give targets"
            )
    assignments = resolve(spec, sites, methods)
    reasons = {a.site.path: f"matched adapters[{a.rule}]" for a in assignments}
    return Plan(assignments, "manual", reasons=reasons)
