"""The plan: which method and hyperparameters each chosen site gets, why, and what it costs.

`type_scores` / `site_scores` hold PLoP NFN scores when the placement computed them;
`reasons` says why each site was or was not chosen (for a placement: every site, the ones it
could never choose included, such as modules outside the repeated blocks), `type_reasons` the
same per module type. `table()` renders it for people, left-out sites included, and
`to_dict()` / `to_json()` for tools.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from cost_model.costs import COST_NAMES, CostRow, cost_row
from rewrite.spec import Assignment


@dataclass
class Plan:
    assignments: list[Assignment]
    strategy: str = "manual"
    type_scores: dict[str, float] = field(default_factory=dict)
    site_scores: dict[str, float] = field(default_factory=dict)
    reasons: dict[str, str] = field(default_factory=dict)
    type_reasons: dict[str, str] = field(default_factory=dict)
    unscored: dict[str, str] = field(default_factory=dict)  # path -> why it has no NFN
    budget: str | None = None  # e.g. "params 0.5%"
    budget_limit: int | None = None  # the budget in absolute units
    budget_kind: str | None = None  # params | flops
    base_params: int | None = None
    base_flops_per_token: int | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def sites(self) -> list[Assignment]:
        """The chosen sites, each with `.path`, `.rank`, `.method` and `.site`."""
        return self.assignments

    def __iter__(self):
        return iter(self.assignments)

    def __len__(self) -> int:
        return len(self.assignments)

    def methods(self) -> set[str]:
        return {a.method.name for a in self.assignments}

    def trainable_parameters(self) -> int:
        """Trainable adapter parameters, counting each shared tensor once."""
        seen, total = set(), 0
        for a in self.assignments:
            for name, spec in a.method.params(a.site).items():
                key = (a.method.name, name) if spec.shared else (a.site.path, name)
                if spec.trainable and key not in seen:
                    seen.add(key)
                    n = 1
                    for s in spec.shape:
                        n *= s
                    total += n
        return total

    # -- costs ------------------------------------------------------------------------------

    def cost_rows(self, tokens: int = 1) -> list[CostRow]:
        """Each chosen site's cost formulas and their values at `tokens` tokens."""
        return [cost_row(a.method, a.site, tokens) for a in self.assignments]

    def extra_flops(self, tokens: int = 1) -> dict[str, int]:
        """The adapters' extra forward and backward FLOPs for `tokens` tokens."""
        rows = self.cost_rows(tokens)
        return {
            "forward": sum(r.values["flops_forward"] for r in rows),
            "backward": sum(r.values["flops_backward"] for r in rows),
        }

    def totals(self, tokens: int = 1) -> dict[str, Any]:
        rows = self.cost_rows(tokens)
        out: dict[str, Any] = {"tokens": tokens, "sites": len(self.assignments)}
        out["trainable_params"] = self.trainable_parameters()
        for name in COST_NAMES[1:]:
            out[name] = sum(r.values[name] for r in rows)
        if self.base_params:
            out["trainable_percent"] = 100 * out["trainable_params"] / self.base_params
        if self.base_flops_per_token:
            per_token = sum(r.values["flops_forward"] for r in self.cost_rows(1))
            out["extra_forward_flops_percent"] = 100 * per_token / self.base_flops_per_token
        return out

    # -- rendering --------------------------------------------------------------------------

    def to_dict(self, tokens: int = 1) -> dict[str, Any]:
        rows = {r.path: r for r in self.cost_rows(tokens)}
        return {
            "strategy": self.strategy,
            "budget": {"spec": self.budget, "kind": self.budget_kind, "limit": self.budget_limit}
            if self.budget
            else None,
            "base": {"params": self.base_params, "flops_per_token": self.base_flops_per_token},
            "totals": self.totals(tokens),
            "type_scores": self.type_scores,
            "type_reasons": self.type_reasons,
            "site_scores": self.site_scores,
            "unscored": self.unscored,
            "sites": [
                {
                    "path": a.path,
                    "module_type": a.site.module_type,
                    "layer": a.site.layer,
                    "method": a.method.name,
                    "rank": a.rank,
                    "rule": a.rule,
                    "nfn": self.site_scores.get(a.path),
                    "reason": self.reasons.get(a.path),
                    "cost": {"formulas": rows[a.path].formulas, "values": rows[a.path].values},
                }
                for a in self.assignments
            ],
            "reasons": self.reasons,
            "notes": self.notes,
        }

    def to_json(self, tokens: int = 1) -> str:
        return json.dumps(self.to_dict(tokens), indent=2)

    def table(self, tokens: int = 1) -> str:
        """A plain-text report: totals, module types with NFN and why, then the chosen sites."""
        totals = self.totals(tokens)
        head = f"placement: {self.strategy}"
        if self.budget_kind == "rank":
            head += f", rank budget {self.budget_limit} (the rules' ranks, redistributed)"
        elif self.budget:
            head += f", budget {self.budget} = {self.budget_limit:,} {self.budget_kind}"
        lines = [head]
        pct = totals.get("trainable_percent")
        lines.append(
            f"chosen {totals['sites']} sites; trainable params {totals['trainable_params']:,}"
            + (f" ({pct:.3f}% of {self.base_params:,})" if pct is not None else "")
            + f"; extra FLOPs at T={tokens}: forward {totals['flops_forward']:,}, "
            f"backward {totals['flops_backward']:,}"
        )
        chosen_types = {a.site.module_type for a in self.assignments}
        types = sorted(set(self.type_scores) | set(self.type_reasons) | chosen_types)
        if types:
            lines.append("")
            lines.append(f"{'module type':<28} {'mean NFN':>9}  {'chosen':<6} why")
            ordered = sorted(types, key=lambda t: (self.type_scores.get(t, float("inf")), t))
            for t in ordered:
                score = self.type_scores.get(t)
                lines.append(
                    f"{t:<28} {'-' if score is None else f'{score:.4f}':>9}  "
                    f"{'yes' if t in chosen_types else 'no':<6} {self.type_reasons.get(t, '')}"
                )
        if self.assignments:
            rows = {r.path: r for r in self.cost_rows(tokens)}
            lines.append("")
            lines.append(
                f"{'site':<44} {'method':<8} {'rank':>4} {'NFN':>7}  {'params':>10}  "
                f"{'fwd FLOPs':>12}  params formula"
            )
            for a in self.assignments:
                r = rows[a.path]
                nfn = self.site_scores.get(a.path)
                lines.append(
                    f"{a.path:<44} {a.method.name:<8} {a.rank!s:>4} "
                    f"{'-' if nfn is None else f'{nfn:.3f}':>7}  {r.values['params']:>10,}  "
                    f"{r.values['flops_forward']:>12,}  {r.formulas['params']}"
                )
        lines.extend(self._left_out_lines())
        lines.extend(f"note: {n}" for n in self.notes)
        return "\n".join(lines)

    def _left_out_lines(self) -> list[str]:
        """Why each site with a reason was not chosen, one line per (module type, reason): the
        sites of one type usually share it, and a line per site would swamp a deep model."""
        from rewrite.sites import split_path

        chosen = {a.path for a in self.assignments}
        groups: dict[tuple[str, str], list[str]] = {}
        for path, why in self.reasons.items():
            if path not in chosen:
                groups.setdefault((split_path(path)[0], why), []).append(path)
        if not groups:
            return []
        rows = [
            (paths[0] if len(paths) == 1 else t, len(paths), why)
            for (t, why), paths in groups.items()
        ]
        width = max(28, *(len(r[0]) for r in rows))
        lines = ["", f"{'left out':<{width}} {'sites':>5}  why"]
        lines += [f"{label:<{width}} {n:>5}  {why}" for label, n, why in rows]
        return lines

    def heatmap_data(self) -> tuple[list[int], list[str], list[list[float | None]]]:
        """Layers x module types of site NFN (None where a type has no scored site in a layer)."""
        from rewrite.sites import split_path

        cells: dict[tuple[int, str], float] = {}
        for path, score in self.site_scores.items():
            module_type, layer = split_path(path)
            if layer is not None:
                cells[(layer, module_type)] = score
        layers = sorted({k[0] for k in cells})
        types = sorted({k[1] for k in cells})
        return layers, types, [[cells.get((li, t)) for t in types] for li in layers]
