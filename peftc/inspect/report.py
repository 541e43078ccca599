"""The HTML report: one self-contained file with the site table, the plan (and its NFN heatmap
when scores exist), the pass trace with collapsible diffs, graph pictures as inline SVG, and
an explanation per adapted site.

Nothing in the page is fetched: styles are inline, pictures are inline SVG, there is no script.
Pictures are laid out by Graphviz's `dot` when it is installed and by peftc's own pure-Python
layout otherwise (`peftc.inspect.render.render_svg`), so every report has them.
"""

from __future__ import annotations

import html
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from peftc.inspect.dot import COLOURS, FONT_COLOURS, LEGEND
from peftc.inspect.explain import explain, format_explanation
from peftc.inspect.graph import neighbourhood, program_graph, site_nodes
from peftc.inspect.passes_trace import rule_lines
from peftc.inspect.render import render_svg
from peftc.inspect.table import SiteRow, site_rows, summary_line
from rewrite.files import write_atomic

CSS = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222;
       padding: 0 1em; }
h1 { font-size: 1.5em; } h2 { border-bottom: 1px solid #ccc; margin-top: 2em; }
table { border-collapse: collapse; margin: .5em 0; }
th, td { border: 1px solid #ddd; padding: 2px 8px; text-align: left; }
th { background: #f4f4f4; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
tr.unadapted td { color: #999; }
tr.adapted td.method { background: ADAPTER_COLOUR33; }
pre { background: #f8f8f8; padding: .6em; overflow-x: auto; font-size: 12px; }
pre .add { color: #116611; } pre .del { color: #aa1111; } pre .hunk { color: #555599; }
figure { margin: 1em 0; overflow-x: auto; border: 1px solid #eee; }
figcaption { font-weight: bold; padding: .3em; }
.legend span { display: inline-block; padding: 0 .6em; margin-right: .4em; }
td.heat { text-align: center; min-width: 3.5em; }
td.heat.chosen { outline: 2px solid #000; outline-offset: -2px; font-weight: bold; }
""".replace("ADAPTER_COLOUR", COLOURS["adapter"])


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _site_table(rows: Sequence[SiteRow]) -> str:
    show_nfn = any(r.nfn is not None for r in rows)
    head = ["path", "op", "in → out", "dtype", "group", "method", "rank", "trainable params"]
    head += ["NFN"] if show_nfn else []
    head += ["fwd FLOPs/token", "bwd FLOPs/token", "why"]
    out = ['<table id="sites"><thead><tr>']
    out += [f"<th>{_e(h)}</th>" for h in head]
    out.append("</tr></thead><tbody>")
    for r in rows:
        cls = "adapted" if r.adapted else "unadapted"
        cells = [
            f"<td>{_e(r.path)}</td>",
            f"<td>{_e(r.op)}</td>",
            f'<td class="num">{r.in_features} → {r.out_features}</td>',
            f"<td>{_e(r.dtype)}</td>",
            f'<td title="{_e(", ".join(r.group))}">{f"g{r.group_id}" if r.group_id else "-"}</td>',
            f'<td class="method">{_e(r.method or "-")}</td>',
            f'<td class="num">{"-" if r.rank is None else r.rank}</td>',
            f'<td class="num">{f"{r.params:,}" if r.adapted else "-"}</td>',
        ]
        if show_nfn:
            cells.append(f'<td class="num">{"-" if r.nfn is None else f"{r.nfn:.3f}"}</td>')
        for key in ("flops_forward", "flops_backward"):
            cells.append(f'<td class="num">{f"{r.cost[key]:,}" if r.cost else "-"}</td>')
        cells.append(f"<td>{_e(r.reason or '')}</td>")
        out.append(
            f'<tr class="site {cls}" data-path="{_e(r.path)}" data-adapted="{str(r.adapted).lower()}">'
            + "".join(cells)
            + "</tr>"
        )
    out.append("</tbody></table>")
    return "\n".join(out)


VIRIDIS = ((253, 231, 37), (33, 145, 140), (68, 1, 84))  # low (adapt first) -> high


def _heat_colour(value: float, lo: float, hi: float) -> tuple[str, str]:
    """Background and text colour of a score on a three-stop viridis scale."""
    t = 0.5 if hi <= lo else (value - lo) / (hi - lo)
    a, b = (VIRIDIS[0], VIRIDIS[1]) if t <= 0.5 else (VIRIDIS[1], VIRIDIS[2])
    u = t * 2 if t <= 0.5 else t * 2 - 1
    r, g, bl = (round(x + (y - x) * u) for x, y in zip(a, b))
    return f"rgb({r},{g},{bl})", ("#000" if t < 0.45 else "#fff")


def _heatmap(adapted: Any) -> str:
    """Module type × layer grid of per-site NFN, plus each type's mean (PLoP's type score)."""
    plan = adapted.plan
    if not plan.site_scores and not plan.type_scores:
        return f"<p>No NFN scores were computed for this plan (strategy {_e(plan.strategy)}).</p>"
    chosen = {a.site.path for a in plan}
    types = sorted({s.module_type for s in adapted.sites})
    layers = sorted({s.layer for s in adapted.sites}, key=lambda x: (x is None, x or 0))
    cell = {(s.module_type, s.layer): s for s in adapted.sites}
    values = [float(v) for v in plan.site_scores.values()]
    lo, hi = (min(values), max(values)) if values else (0.0, 1.0)
    out = ['<table id="nfn-heatmap"><thead><tr><th>type \\ layer</th>']
    out += [f"<th>{'-' if la is None else la}</th>" for la in layers]
    out.append("<th>type mean</th></tr></thead><tbody>")
    for t in types:
        out.append(f"<tr><th>{_e(t)}</th>")
        for la in layers:
            site = cell.get((t, la))
            score = plan.site_scores.get(site.path) if site else None
            if score is None:
                out.append('<td class="heat">·</td>')
                continue
            colour, ink = _heat_colour(float(score), lo, hi)
            cls = "heat chosen" if site.path in chosen else "heat"
            out.append(
                f'<td class="{cls}" style="background:{colour};color:{ink}" '
                f'title="{_e(site.path)}">{float(score):.2f}</td>'
            )
        mean = plan.type_scores.get(t)
        out.append(f'<td class="num">{"-" if mean is None else f"{float(mean):.3f}"}</td></tr>')
    out.append("</tbody></table>")
    out.append(
        "<p>Outlined cells are the sites the plan adapts. Yellow is a low NFN (PLoP adapts "
        "the module types with the lowest mean first), purple a high one.</p>"
    )
    return "\n".join(out)


def _plan(adapted: Any) -> str:
    plan, spec = adapted.plan, adapted.spec
    out = [f"<p>Strategy: <b>{_e(plan.strategy)}</b>. {_e(summary_line(adapted))}.</p>"]
    out.append('<table id="plan-rules"><thead><tr><th>rule</th><th>sites</th>')
    out.append("<th>trainable params</th></tr></thead><tbody>")
    for rule in spec.adapters:
        taken = [a for a in plan if a.rule == rule.index]
        n = sum(
            math.prod(s.shape)
            for a in taken
            for s in a.method.params(a.site).values()
            if s.trainable and not s.shared
        )
        out.append(
            f'<tr><td>{_e(rule.describe())}</td><td class="num">{len(taken)}</td>'
            f'<td class="num">{n:,}</td></tr>'
        )
    out.append("</tbody></table>")
    out.append("<h3>NFN heatmap</h3>")
    out.append(_heatmap(adapted))
    return "\n".join(out)


def _diff_html(diff: str) -> str:
    lines = []
    for line in diff.splitlines():
        cls = ""
        if line.startswith("@@"):
            cls = "hunk"
        elif line.startswith("+") and not line.startswith("+++"):
            cls = "add"
        elif line.startswith("-") and not line.startswith("---"):
            cls = "del"
        lines.append(f'<span class="{cls}">{_e(line)}</span>' if cls else _e(line))
    return "\n".join(lines)


def _passes(records: Sequence[Any]) -> str:
    out = ['<table id="passes"><thead><tr><th>#</th><th>pass</th><th>time</th>']
    out.append("<th>changed</th><th>nodes</th><th>rules</th></tr></thead><tbody>")
    for i, r in enumerate(records, 1):
        rules = "<br>".join(_e(x) for x in rule_lines(r)) or "-"
        out.append(
            f'<tr class="pass"><td class="num">{i}</td><td>{_e(r.name)}</td>'
            f'<td class="num">{r.seconds * 1e3:.1f} ms</td><td>{"yes" if r.modified else "no"}</td>'
            f'<td class="num">{r.nodes_before} → {r.nodes_after}</td><td>{rules}</td></tr>'
        )
    out.append("</tbody></table>")
    for r in records:
        if not r.diff:
            continue
        added = sum(1 for x in r.diff.splitlines() if x.startswith("+") and not x.startswith("+++"))
        removed = sum(
            1 for x in r.diff.splitlines() if x.startswith("-") and not x.startswith("---")
        )
        out.append(
            f'<details class="diff" data-pass="{_e(r.name)}"><summary>diff of the generated code '
            f"after {_e(r.name)} (+{added} −{removed} lines)</summary>"
            f"<pre>{_diff_html(r.diff)}</pre></details>"
        )
    return "\n".join(out)


def default_picture_sites(adapted: Any, limit: int = 4) -> list[str]:
    """The first adapted site of each (module type, method): one picture per kind of adapter."""
    seen, out = set(), []
    for a in adapted.plan:
        key = (a.site.module_type, a.method.name)
        if key not in seen:
            seen.add(key)
            out.append(a.site.path)
    return out[:limit]


def _pictures(adapted: Any, paths: Sequence[str], radius: int) -> str:
    legend = "".join(
        f'<span style="background:{c};color:{FONT_COLOURS.get(role, "#000")}">{_e(role)}</span>'
        for role, c in COLOURS.items()
    )
    out = [f'<p class="legend">{legend} {_e(LEGEND)}; radius {radius} around each site.</p>']
    g = program_graph(adapted.program(values=True))
    for path in paths:
        centers = site_nodes(g, path)[path]
        # the legend is drawn once, above the pictures
        svg = render_svg(neighbourhood(g, centers, radius), f"around {path}", legend=False)
        out.append(
            f'<figure data-site="{_e(path)}"><figcaption>{_e(path)}</figcaption>{svg}</figure>'
        )
    return "\n".join(out)


def _explanations(adapted: Any) -> str:
    if not len(adapted.plan):
        return "<p>No site is adapted.</p>"
    chosen = {a.site.path for a in adapted.plan}
    # one explain() call for all adapted sites: it merges the model once
    out = []
    for e in explain(adapted, "*"):
        if e.path in chosen:
            out.append(
                f'<details class="explain" data-site="{_e(e.path)}"><summary>{_e(e.path)}'
                f"</summary><pre>{_e(format_explanation(e))}</pre></details>"
            )
    return "\n".join(out)


def html_report(
    adapted: Any,
    pictures: Sequence[str] | None = None,
    radius: int = 2,
    tokens: int = 1,
    title: str | None = None,
) -> str:
    """The report as one HTML string; `pictures` are site paths to draw (default: one site
    per kind of adapter)."""
    title = title or f"peftc inspect: {type(adapted.base).__name__}"
    paths = list(pictures) if pictures is not None else default_picture_sites(adapted)
    rows = site_rows(adapted, tokens=tokens, include_all=True)
    pipeline = " → ".join(r.name for r in adapted.pass_records)
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{_e(title)}</title><style>{CSS}</style></head><body>",
        f"<h1>{_e(title)}</h1>",
        f"<p>{_e(summary_line(adapted))}. Pipeline: {_e(pipeline)}.</p>",
        '<section id="site-table"><h2>Sites</h2>',
        _site_table(rows),
        "</section>",
        '<section id="plan"><h2>Plan</h2>',
        _plan(adapted),
        "</section>",
        '<section id="pass-trace"><h2>Pass trace</h2>',
        _passes(adapted.pass_trace(diffs=True)),
        "</section>",
        '<section id="pictures"><h2>Graph around sites</h2>',
        _pictures(adapted, paths, radius) if paths else "<p>No site to draw.</p>",
        "</section>",
        '<section id="explain"><h2>Adapted sites explained</h2>',
        _explanations(adapted),
        "</section>",
        "</body></html>",
    ]
    return "\n".join(parts) + "\n"


def write_report(adapted: Any, path: str | os.PathLike, **options: Any) -> Path:
    """Write `html_report(adapted, **options)` to `path` (atomically)."""
    return write_atomic(path, html_report(adapted, **options))
