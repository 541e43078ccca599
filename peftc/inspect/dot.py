"""Write a graph from `peftc.inspect.graph` as Graphviz DOT text, coloured by node role.

Adapter nodes are orange, fused nodes blue, base nodes grey; a base op that is a site gets a
thick outline. Each site's adapter/fused nodes are drawn inside a dashed cluster labelled with
the site path. Every node keeps its FX name as its DOT name and SVG `id`, and its role in a
`peftc_role` attribute, so tools can read the picture back. `node_label`, `node_shape` and
`colour_role` are shared with the pure-Python SVG writer (`peftc.inspect.svg`), so both
pictures say the same things.
"""

from __future__ import annotations

import networkx as nx

from peftc.inspect.graph import ADAPTER, BASE, FUSED

COLOURS = {ADAPTER: "#f28e2b", FUSED: "#4e79a7", BASE: "#d3d3d3"}
FONT_COLOURS = {FUSED: "#ffffff"}
EDGE_COLOUR = "#777777"
LEGEND = "orange: adapter nodes, blue: fused nodes, grey: base model (thick outline: a site op)"


def quote(text: str) -> str:
    """A DOT double-quoted string."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def node_label(name: str, data: dict) -> str:
    """A node's label lines: FX name, target (or the state it holds), shape and dtype."""
    lines = [name]
    if data["op"] == "placeholder" and data.get("state"):
        lines.append(data["state"])
    elif data["target"] not in (name, data["op"]):
        lines.append(data["target"])
    if data["value"]:
        lines.append(data["value"])
    return "\n".join(lines)


def node_shape(data: dict) -> str:
    """The Graphviz shape: ellipse for inputs and attributes, doubleoctagon for the output,
    box for ops."""
    if data["op"] == "placeholder" or data["op"] == "get_attr":
        return "ellipse"
    if data["op"] == "output":
        return "doubleoctagon"
    return "box"


def colour_role(data: dict) -> str:
    """The role whose colour a node is filled with (an unknown role is drawn as an adapter)."""
    return data["role"] if data["role"] in COLOURS else ADAPTER


def cluster_members(g: nx.DiGraph) -> dict[str, list[str]]:
    """Site path -> the adapter/fused nodes drawn in its dashed box (nodes of one site only)."""
    members: dict[str, list[str]] = {}
    for name, data in g.nodes(data=True):
        if data["role"] != BASE and len(data["sites"]) == 1:
            members.setdefault(data["sites"][0], []).append(name)
    return members


def to_dot(g: nx.DiGraph, title: str = "peftc", clusters: bool = True) -> str:
    """DOT text for `g` (nodes need the attributes `program_graph` sets)."""
    lines = [
        f"digraph {quote(title)} {{",
        f"  graph [rankdir=TB, fontname=Helvetica, fontsize=12, label={quote(title)}, labelloc=t];",
        "  node [style=filled, fontname=Helvetica, fontsize=9, penwidth=1];",
        f'  edge [color="{EDGE_COLOUR}", arrowsize=0.6];',
    ]
    for name, data in g.nodes(data=True):
        role = colour_role(data)
        attrs = {
            "id": name,  # Graphviz's SVG then names the node's <g> like the FX node
            "label": node_label(name, data),
            "shape": node_shape(data),
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
        for path, names in cluster_members(g).items():
            # the `cluster` prefix makes Graphviz draw a box; the SVG id names the site
            name = quote(f"cluster:{path}")
            lines.append(f"  subgraph {name} {{")
            lines.append(f"    id={name}; label={quote(path)}; style=dashed; fontsize=10;")
            lines.append(f'    color="{COLOURS[ADAPTER]}";')
            lines.extend(f"    {quote(n)};" for n in names)
            lines.append("  }")
    # FX names are identifiers, so `u->v` never collides with a node's id
    lines.extend(f"  {quote(u)} -> {quote(v)} [id={quote(f'{u}->{v}')}];" for u, v in g.edges())
    lines.append("}")
    return "\n".join(lines) + "\n"
