"""The site table: one row per site with its shapes, method, rank, parameters, NFN and cost.

Rows come in graph order, each packed projection followed by its slices (`qkv_proj[0:64]`,
named q/k/v or gate/up where the config says so), then the expert weights; `sort_rows` orders them by a column and `filter_rows` keeps the
paths that match globs (the spec's matching: `*.q_proj`, or a dotted suffix like `q_proj`).
`format_table` draws a terminal table and `rows_json` gives plain data for `--json`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from rewrite.spec import path_matches

SORT_KEYS = (
    "order", "path", "layer", "op", "in", "out", "dtype", "group", "method", "rank", "params",
    "nfn", "flops",
)  # fmt: skip


@dataclass
class SiteRow:
    """One site of the model, adapted or not (then method, rank and cost are None)."""

    order: int  # position in graph order
    path: str
    op: str
    module_type: str
    layer: int | None
    in_features: int
    out_features: int
    dtype: str
    group: list[str]  # the sites that read the same input, itself included
    group_id: int | None  # a small number per shared-input group of two or more sites
    adapted: bool
    method: str | None = None
    rank: int | None = None
    params: int = 0  # trainable adapter parameters of this site (shared tensors excluded)
    shared_params: int = 0  # trainable parameters of shared tensors this site reads
    nfn: float | None = None
    cost: dict[str, int] | None = None  # Cost.evaluate(tokens)
    rule: int | None = None
    reason: str | None = None
    hyperparams: dict[str, Any] = field(default_factory=dict)
    part: str | None = None  # a slice's name (q, k, v, gate, up), where the config makes it clear


def site_rows(adapted: Any, tokens: int = 1, include_all: bool = False) -> list[SiteRow]:
    """The rows of `adapted`'s sites: the adapted ones, or every site with `include_all`.

    Costs are evaluated at `tokens` tokens per step (1: per token).
    """
    if tokens < 1:
        raise ValueError(f"tokens must be 1 or more, got {tokens}")
    plan = adapted.plan
    by_path = {a.site.path: a for a in plan}
    group_ids: dict[tuple[str, ...], int] = {}
    rows = []
    index = adapted.sites
    every = [s for whole in index for s in (whole, *index.parts_of(whole.path))]
    every += list(index.experts.values())
    for order, site in enumerate(every):
        a = by_path.get(site.path)
        if a is None and not include_all:
            continue
        group_id = None
        if len(site.group) > 1:
            group_id = group_ids.setdefault(site.group, len(group_ids) + 1)
        nfn = plan.site_scores.get(site.path)
        row = SiteRow(
            order=order,
            path=site.path,
            op=site.op,
            module_type=site.module_type,
            layer=site.layer,
            in_features=site.in_features,
            out_features=site.out_features,
            dtype=str(site.dtype).removeprefix("torch."),
            group=list(site.group),
            group_id=group_id,
            adapted=a is not None,
            nfn=None if nfn is None else float(nfn),
            part=site.part,
        )
        if a is not None:
            specs = a.method.params(site).values()
            row.method = a.method.name
            row.rank = a.rank
            row.params = sum(math.prod(s.shape) for s in specs if s.trainable and not s.shared)
            row.shared_params = sum(math.prod(s.shape) for s in specs if s.trainable and s.shared)
            row.cost = a.method.cost(site).evaluate(tokens)
            row.rule = a.rule
            row.reason = plan.reasons.get(site.path)
            row.hyperparams = _hyperparams(a.method)
        rows.append(row)
    return rows


def _hyperparams(method: Any) -> dict[str, Any]:
    try:
        return {k: v for k, v in asdict(method).items() if isinstance(v, int | float | str | bool)}
    except TypeError:  # not a dataclass
        return {}


def filter_rows(rows: Sequence[SiteRow], patterns: Sequence[str] | None) -> list[SiteRow]:
    """The rows whose path matches any of `patterns` (all rows when there are none)."""
    if not patterns:
        return list(rows)
    return [r for r in rows if any(path_matches(r.path, p) for p in patterns)]


def _sort_value(row: SiteRow, key: str) -> Any:
    return {
        "order": row.order,
        "path": row.path,
        "layer": row.layer,
        "op": row.op,
        "in": row.in_features,
        "out": row.out_features,
        "dtype": row.dtype,
        "group": row.group_id,
        "method": row.method,
        "rank": row.rank,
        "params": row.params,
        "nfn": row.nfn,
        "flops": row.cost["flops_forward"] if row.cost else None,
    }[key]


def sort_rows(rows: Sequence[SiteRow], key: str = "order") -> list[SiteRow]:
    """Rows ordered by column `key`; a leading '-' sorts descending. Missing values go last."""
    descending = key.startswith("-")
    name = key.lstrip("-")
    if name not in SORT_KEYS:
        raise ValueError(f"cannot sort by {name!r}; sort keys: {', '.join(SORT_KEYS)}")
    present = [r for r in rows if _sort_value(r, name) is not None]
    missing = [r for r in rows if _sort_value(r, name) is None]
    present.sort(key=lambda r: r.order)
    # a stable sort (reverse keeps it stable): ties stay in graph order either way
    present.sort(key=lambda r: _sort_value(r, name), reverse=descending)
    return present + missing


def summary_line(adapted: Any) -> str:
    """`N of M sites adapted (methods); trainable P adapter parameters (shared ones once)`."""
    plan = adapted.plan
    methods = ", ".join(sorted(plan.methods())) or "none"
    return (
        f"{len(plan)} of {len(adapted.sites)} sites adapted ({methods}); "
        f"{plan.trainable_parameters():,} trainable adapter parameters"
    )


def rows_json(rows: Sequence[SiteRow]) -> list[dict[str, Any]]:
    return [asdict(r) for r in rows]


def _si(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.1f}{unit}"
    return str(n)


def format_table(rows: Sequence[SiteRow], tokens: int = 1) -> str:
    """A terminal table of `rows`; the NFN column appears when any row has a score."""
    show_nfn = any(r.nfn is not None for r in rows)
    flops = "fwd FLOPs/tok" if tokens == 1 else f"fwd FLOPs@{tokens}"
    header = ["path", "op", "in->out", "dtype", "group", "method", "rank", "params"]
    header += ["NFN"] if show_nfn else []
    header += [flops]
    body = []
    for r in rows:
        cells = [
            f"{r.path} ({r.part})" if r.part else r.path,
            r.op,
            f"{r.in_features}->{r.out_features}",
            r.dtype,
            f"g{r.group_id}" if r.group_id else "-",
            r.method or "-",
            "-" if r.rank is None else str(r.rank),
            (f"{r.params:,}" + (f"+{r.shared_params:,}s" if r.shared_params else ""))
            if r.adapted
            else "-",
        ]
        cells += [("-" if r.nfn is None else f"{r.nfn:.3f}")] if show_nfn else []
        cells += [_si(r.cost["flops_forward"]) if r.cost else "-"]
        body.append(cells)
    right = {i for i, h in enumerate(header) if h in ("rank", "params", "NFN", flops)}
    widths = [max(len(str(x)) for x in col) for col in zip(header, *body)]

    def line(cells: list[str]) -> str:
        return "  ".join(
            c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))
        ).rstrip()

    out = [line(header), line(["-" * w for w in widths])]
    out.extend(line(c) for c in body)
    return "\n".join(out)
