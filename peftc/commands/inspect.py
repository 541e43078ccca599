"""`peftc inspect --model M --spec S`: which sites got adapters, what each pass did, and pictures.

Prints the site table and the pass trace (or JSON with `--json`, or one site's story with
`--explain`), and writes DOT/SVG/PNG pictures and an HTML report on request. SVG and the
report's pictures need no system program; PNG needs Graphviz's `dot`.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict

import networkx as nx

import peftc
from peftc.commands.loading import example_inputs, load_model
from peftc.inspect.dot import LEGEND, to_dot
from peftc.inspect.explain import explain, format_explanation
from peftc.inspect.graph import neighbourhood, program_graph, site_nodes
from peftc.inspect.passes_trace import format_trace, trace_json
from peftc.inspect.render import INSTALL_HINT, GraphvizNotFound, dot_program, render, render_svg
from peftc.inspect.report import write_report
from peftc.inspect.table import (
    SORT_KEYS,
    filter_rows,
    format_table,
    rows_json,
    site_rows,
    sort_rows,
    summary_line,
)
from rewrite.files import write_atomic


def add_parser(sub) -> None:
    p = sub.add_parser(
        "inspect",
        help="show which sites got adapters and what the passes did",
        description="Show the adapted sites, the pass trace, graph pictures and an HTML report.",
    )
    p.add_argument("--model", required=True, help="HF model dir or module:factory")
    p.add_argument("--spec", required=True, help="spec file (.yaml/.json)")
    p.add_argument("--json", action="store_true", help="print the table and trace as JSON")
    p.add_argument(
        "--sort",
        default="order",
        metavar="KEY",
        help=f"sort the site table by one of {', '.join(SORT_KEYS)}; "
        "a leading '-' sorts descending (write --sort=-params)",
    )
    p.add_argument(
        "--filter",
        action="append",
        metavar="GLOB",
        help="keep sites whose path matches (a glob or a dotted suffix); repeatable",
    )
    p.add_argument("--all", action="store_true", help="list every site, not just adapted ones")
    p.add_argument("--tokens", type=int, default=1, help="tokens per step for the cost columns")
    p.add_argument("--diff", action="store_true", help="show each pass's diff of the graph code")
    p.add_argument("--dot", metavar="PATH", help="write the graph as Graphviz DOT")
    p.add_argument(
        "--svg",
        metavar="PATH",
        help="draw the graph as SVG (laid out by graphviz if installed, else by peftc)",
    )
    p.add_argument("--png", metavar="PATH", help="render the graph to PNG (needs graphviz)")
    p.add_argument(
        "--around", metavar="GLOB", help="draw only the neighbourhood of the matching sites"
    )
    p.add_argument("--radius", type=int, default=2, help="edges from the sites for --around")
    p.add_argument("--html", metavar="PATH", help="write a self-contained HTML report")
    p.add_argument("--explain", metavar="GLOB", help="explain the matching sites")


def _picture(adapted, args: argparse.Namespace) -> tuple[nx.DiGraph, str]:
    g = program_graph(adapted.program(values=True))
    title = type(adapted.base).__name__
    if args.around:
        centers = [n for nodes in site_nodes(g, args.around).values() for n in nodes]
        g = neighbourhood(g, centers, args.radius)
        title += f" around {args.around} (radius {args.radius})"
    return g, title


def _write_pictures(adapted, args: argparse.Namespace) -> int:
    if not (args.dot or args.svg or args.png):
        return 0
    g, title = _picture(adapted, args)
    if args.dot:
        print(f"wrote {write_atomic(args.dot, to_dot(g, title))} ({LEGEND})", file=sys.stderr)
    if args.svg:
        print(f"wrote {write_atomic(args.svg, render_svg(g, title))} ({LEGEND})", file=sys.stderr)
    if args.png:
        try:
            picture = render(to_dot(g, title), "png")
        except GraphvizNotFound as e:  # checked before compiling; dot may have gone since
            print(f"peftc inspect: {e}", file=sys.stderr)
            return 2
        print(f"wrote {write_atomic(args.png, picture)} ({LEGEND})", file=sys.stderr)
    return 0


def run(args: argparse.Namespace) -> int:
    if args.around and not (args.dot or args.svg or args.png or args.html):
        raise ValueError("--around picks what to draw; add --dot, --svg, --png or --html")
    if args.radius < 0:
        raise ValueError(f"--radius must be 0 or more, got {args.radius}")
    sort_rows([], args.sort)  # a bad sort key fails before the (slower) compile
    if args.png and dot_program() is None:  # SVG is drawn without Graphviz when it is missing
        print(f"peftc inspect: {INSTALL_HINT}", file=sys.stderr)
        return 2
    model = load_model(args.model)
    adapted = peftc.compile(model, args.spec, example_inputs(model))
    rc = _write_pictures(adapted, args)
    if args.html:
        pictures = None
        if args.around:  # every site the glob names (site_nodes fails naming the glob if none)
            matched = site_nodes(program_graph(adapted.program(values=True)), args.around)
            pictures = [s.path for s in adapted.sites if s.path in matched]
        path = write_report(adapted, args.html, pictures=pictures, radius=args.radius)
        print(f"wrote {path}", file=sys.stderr)
    if args.explain:
        found = explain(adapted, args.explain, tokens=args.tokens)
        if args.json:
            print(json.dumps([asdict(e) for e in found], indent=2))
        else:
            print("\n\n".join(format_explanation(e) for e in found))
        return rc
    rows = site_rows(adapted, tokens=args.tokens, include_all=args.all)
    rows = sort_rows(filter_rows(rows, args.filter), args.sort)
    if args.json:
        data = {
            "summary": summary_line(adapted),
            "trainable_parameters": adapted.plan.trainable_parameters(),
            "strategy": adapted.plan.strategy,
            "sites": rows_json(rows),
            "passes": trace_json(adapted.pass_trace(diffs=args.diff), diff=args.diff),
        }
        print(json.dumps(data, indent=2))
        return rc
    print(format_table(rows, args.tokens))
    print(summary_line(adapted))
    print()
    print("passes:")
    print(format_trace(adapted.pass_trace(diffs=args.diff), diff=args.diff))
    return rc
