"""Inspect adapted models: site tables, per-pass traces, DOT/SVG pictures, an HTML report and
per-site explanations. One job per module:

- `table`: the site table (sort, filter, text, JSON)
- `passes_trace`: what each pass did (rules, declines, diffs)
- `graph`: the FX graph as networkx, node roles, site neighbourhoods
- `dot` / `render` / `svg`: DOT text; SVG through Graphviz when `dot` is installed, else laid
  out in pure Python (grandalf); PNG through Graphviz
- `report`: the self-contained HTML report
- `explain`: one site's original node, adapter subgraph, merged form, formula and reason
"""

from peftc.inspect.dot import COLOURS, to_dot
from peftc.inspect.explain import Explanation, explain, format_explanation
from peftc.inspect.graph import neighbourhood, program_graph, site_nodes
from peftc.inspect.passes_trace import format_trace, trace_json
from peftc.inspect.render import GraphvizNotFound, GraphvizTimeout, render, render_svg
from peftc.inspect.report import html_report, write_report
from peftc.inspect.table import filter_rows, format_table, site_rows, sort_rows

__all__ = [
    "COLOURS",
    "Explanation",
    "GraphvizNotFound",
    "GraphvizTimeout",
    "explain",
    "filter_rows",
    "format_explanation",
    "format_table",
    "format_trace",
    "html_report",
    "neighbourhood",
    "program_graph",
    "render",
    "render_svg",
    "site_nodes",
    "site_rows",
    "sort_rows",
    "to_dot",
    "trace_json",
    "write_report",
]
