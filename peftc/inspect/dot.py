"""Write a graph from `peftc.inspect.graph` as Graphviz DOT text, coloured by node role.

Adapter nodes are orange, fused nodes blue, base nodes grey; a base op that is a site gets a
thick outline. Each site's adapter/fused nodes are drawn inside a dashed cluster labelled with
the site path. Every node keeps its FX name as its DOT id and its role in a `peftc_role`
attribute, so tools can read the picture back.
"""

from __future__ import annotations

import networkx as nx

from peftc.inspect.graph import ADAPTER, BASE, FUSED

COLOURS = {ADAPTER: "#f28e2b", FUSED: "#4e79a7", BASE: "#d3d3d3"}
FONT_COLOURS = {FUSED: "#ffffff"}
LEGEND = "orange: adapter nodes, blue: fused nodes, grey: base model (thick outline: a site op)"


def quote(text: str) -> str:
    """A DOT double-quoted string."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _label(name: str, data: dict) -> str:
    lines = [name]
    if data["op"] == "placeholder" and data.get("state"):
        lines.append(data["state"])
    elif data["target"] not in (name, data["op"]):
        lines.append(data["target"])
    if data["value"]:
        lines.append(data["value"])
    return "\n".join(lines)


def _shape(data: dict) -> str:
    if data["op"] == "placeholder" or data["op"] == "get_attr":
        return "ellipse"
    if data["op"] == "output":
        return "doubleoctagon"
    return "box"


def to_dot(g: nx.DiGraph, title: str = "peftc", clusters: bool = True) -> str:
    """DOT text for `g` (nodes need the attributes `program_graph` sets)."""
    lines = [
        f"digraph {quote(title)} {{",
        f"  graph [rankdir=TB, fontname=Helvetica, fontsize=12, label={quote(title)}, labelloc=t];",
        "  node [style=filled, fontname=Helvetica, fontsize=9, penwidth=1];",
        '  edge [color="#777777", arrowsize=0.6];',
    ]
    for name, data in g.nodes(data=True):
        role = data["role"] if data["role"] in COLOURS else ADAPTER
        attrs = {
            "label": _label(name, data),
            "shape": _shape(data),
            "fillcolor": COLOURS[role],
            "fontcolor": FONT_COLOURS.get(role, "#000000"),
            "peftc_role": data["role"],
        }
        if data.get("site_op"):
            attrs["penwidth"] = "3"
            attrs["tooltip"] = f"site {data['site_op']}"
        body = ", ".join(f"{k}={quote(str(v))}" for k, v in attrs.items())
        lines.append(f"  {quote(name)} [{body}];")
    if clusters:
        members: dict[str, list[str]] = {}
        for name, data in g.nodes(data=True):
            if data["role"] != BASE and len(data["sites"]) == 1:
                members.setdefault(data["sites"][0], []).append(name)
        for i, (path, names) in enumerate(members.items()):
            lines.append(f"  subgraph {quote(f'cluster_{i}')} {{")
            lines.append(f'    label={quote(path)}; style=dashed; color="#f28e2b"; fontsize=10;')
            lines.extend(f"    {quote(n)};" for n in names)
            lines.append("  }")
    lines.extend(f"  {quote(u)} -> {quote(v)};" for u, v in g.edges())
    lines.append("}")
    return "\n".join(lines) + "\n"
