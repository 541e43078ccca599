"""SVG pictures of a `peftc.inspect.graph` graph, drawn without any system program.

Graphviz's `dot` lays graphs out best, but it is a system package that a fresh machine may lack.
`draw_svg` lays the graph out in pure Python with grandalf's Sugiyama (layered) layout, the
method `dot` uses, and writes the SVG itself, with the colours, node shapes, thick site
outlines and dashed per-site boxes of the DOT picture (`peftc.inspect.dot`). `tag_graphviz_svg`
tags Graphviz's own SVG the same way, so tools read a picture alike whichever drew it:

- the root `<svg>` has `data-peftc-layout="graphviz"` or `"grandalf"`;
- each node is `<g class="node" id=FX-name data-peftc-role=ROLE>` whose first child is
  `<title>FX-name</title>`; a base op that is a site also has `data-peftc-site=PATH`;
- each edge is `<g class="edge" id="u->v">` with `<title>u->v</title>`;
- each site's dashed box is `<g class="cluster" id="cluster:PATH" data-peftc-site=PATH>`;
- the legend (optional) is `<g class="legend">`, one swatch per role colour and one for the
  thick site outline.

`peftc.inspect.render.render_svg` chooses between the two.

One liberty with the layout: edges out of nodes that hold a size rather than a tensor
(`sym_size` and friends, `walk` False in the graph) are drawn as straight lines but left out of
the layered layout. One such node feeds views in every layer, and its long edges would add
thousands of bend points (4,900 layout vertices instead of 900 for MiniLM's 369 nodes), which
makes the layout several times slower and the picture no clearer.

Speed: the whole MiniLM graph (369 nodes) takes about 0.3 s, a 1,100-node graph about 2.5 s
and a 2,700-node one about 11 s (Graphviz needs over 5 minutes for the last two); `--around`
draws only the part of a graph that matters.
"""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import networkx as nx
from grandalf.graphs import Edge, Vertex, graph_core
from grandalf.layouts import SugiyamaLayout

from peftc.inspect.dot import (
    COLOURS,
    EDGE_COLOUR,
    FONT_COLOURS,
    LEGEND,
    cluster_members,
    colour_role,
    node_label,
    node_shape,
)
from peftc.inspect.graph import ADAPTER, BASE, FUSED

SVG_NS = "http://www.w3.org/2000/svg"
XLINK_NS = "http://www.w3.org/1999/xlink"
# so that ElementTree writes plain <svg>/<g> tags (not ns0:svg) for Graphviz's SVG and ours
ET.register_namespace("", SVG_NS)
ET.register_namespace("xlink", XLINK_NS)

FONT = "Helvetica,sans-Serif"
FONT_SIZE = 9.0  # node labels, as in the DOT picture
LINE = 10.0  # baseline to baseline
CHAR = 5.0  # mean width of a 9pt Helvetica character in FX names and shapes
TITLE_SIZE = 12.0
CLUSTER_SIZE = 10.0
MARGIN = 8.0
PAD = 8.0  # between a cluster's box and its nodes
ARROW = 6.0  # arrowhead length (the DOT picture's arrowsize 0.6)
LEGEND_ITEMS = ((ADAPTER, "adapter nodes"), (FUSED, "fused nodes"), (BASE, "base model"))

Point = tuple[float, float]


def _t(tag: str) -> str:
    return f"{{{SVG_NS}}}{tag}"


def _el(parent: ET.Element, tag: str, text: str | None = None, **attrs: object) -> ET.Element:
    """A child element; attribute names use `_` for `-` (stroke_width -> stroke-width)."""
    el = ET.SubElement(parent, _t(tag), {k.replace("_", "-"): _num(v) for k, v in attrs.items()})
    if text is not None:
        el.text = text
    return el


def _num(value: object) -> str:
    return f"{value:.2f}".rstrip("0").rstrip(".") if isinstance(value, float) else str(value)


def _points(pts: Sequence[Point]) -> str:
    return " ".join(f"{_num(x)},{_num(y)}" for x, y in pts)


class _View:
    """grandalf's view of a vertex: it reads the size (w, h) and writes the centre (xy)."""

    def __init__(self, w: float, h: float):
        self.w, self.h = w, h
        self.xy: Point = (0.0, 0.0)


class _Route:
    """grandalf's view of an edge: it writes the points the edge passes through."""

    def __init__(self) -> None:
        self.pts: list[Point] = []

    def setpath(self, pts: list[Point]) -> None:
        self.pts = list(pts)


def _size(lines: Sequence[str], shape: str) -> tuple[float, float]:
    """Width and height of a node, from its label (Graphviz's minimum size and margins)."""
    w = max(54.0, CHAR * max(len(x) for x in lines) + 16)
    h = max(36.0, LINE * len(lines) + 10)
    if shape == "ellipse":  # the label's box fits inside an ellipse sqrt(2) times its size
        return w * math.sqrt(2), h * math.sqrt(2)
    if shape == "doubleoctagon":
        return w + 24, h + 8
    return w, h


class _Sugiyama(SugiyamaLayout):
    """grandalf's layout with its alignment conflicts in a set: it looks one up for each
    candidate alignment, which on grandalf's list took most of the time on 1,000 nodes."""

    def _detect_alignment_conflicts(self) -> None:
        super()._detect_alignment_conflicts()
        self.conflicts = set(self.conflicts)


def _group_clusters(sug: SugiyamaLayout, cluster_of: dict[str, str]) -> None:
    """Make each cluster's members adjacent in every layer, at their mean place in it, as
    Graphviz keeps a cluster together; a bend of an edge inside one cluster counts as in it."""
    edge_keys: dict[int, str | None] = {}  # id(ctrl) -> the cluster of that edge's bends
    for layer in sug.layers:
        keys = []
        for v in layer:
            if not sug.grx[v].dummy:
                keys.append(cluster_of.get(v.data))
                continue
            # a dummy's ctrl maps ranks to its edge's vertices: the two ends and the dummies
            ctrl = v.ctrl
            if id(ctrl) not in edge_keys:
                ends = {cluster_of.get(ctrl[r].data) for r in (min(ctrl), max(ctrl))}
                edge_keys[id(ctrl)] = ends.pop() if len(ends) == 1 else None
            keys.append(edge_keys[id(ctrl)])
        places: dict[str, list[int]] = {}
        for i, key in enumerate(keys):
            if key is not None:
                places.setdefault(key, []).append(i)
        if not places:
            continue
        mean = {key: sum(p) / len(p) for key, p in places.items()}
        order = sorted(
            range(len(layer)),
            key=lambda i: (i if keys[i] is None else mean[keys[i]], keys[i] or "", i),
        )
        layer[:] = [layer[i] for i in order]
        for i, v in enumerate(layer):
            sug.grx[v].pos = i


def _separate(sug: SugiyamaLayout) -> None:
    """Push apart nodes of a layer that overlap. grandalf places each node at the mean of two
    of its four Brandes-Koepf placements, which can bring neighbours closer than their widths."""
    for layer in sug.layers:
        right = -math.inf
        for v in layer:
            x, y = v.view.xy
            x = max(x, right + sug.xspace + v.view.w / 2)
            v.view.xy = (x, y)
            right = x + v.view.w / 2


@dataclass
class Layout:
    """Where `layout` put things, top to bottom. `rows` gives each node's layer, as
    (component, rank); `bands` the top and bottom of each layer's nodes."""

    centres: dict[str, Point]
    bends: dict[tuple[str, str], list[Point]]  # of each laid-out edge, in order
    rows: dict[str, tuple[int, int]]
    bands: dict[tuple[int, int], tuple[float, float]]


def layout(g: nx.DiGraph, sizes: dict[str, tuple[float, float]]) -> Layout:
    """Lay `g` out with grandalf's Sugiyama layout; `sizes` are each node's width and height.

    Each connected component is laid out alone and placed to the right of the previous one.
    """
    cluster_of = {n: path for path, names in cluster_members(g).items() for n in names}
    laid = nx.Graph()  # the edges given to the layout (see the module docstring)
    laid.add_nodes_from(g)
    laid.add_edges_from((u, v) for u, v in g.edges() if g.nodes[u].get("walk", True))
    order = {name: i for i, name in enumerate(g)}
    components = []
    # grandalf's own Graph() splits components through a set of edges, whose order changes
    # from run to run (and the picture with it); build each component in the graph's order
    for names in sorted(nx.connected_components(laid), key=lambda c: min(order[n] for n in c)):
        vertices = {n: Vertex(n) for n in sorted(names, key=order.get)}
        for n, vertex in vertices.items():
            vertex.view = _View(*sizes[n])
        edges = []
        for u, v in g.edges(vertices):
            if laid.has_edge(u, v):
                edges.append(Edge(vertices[u], vertices[v]))
                edges[-1].view = _Route()
        components.append(graph_core(list(vertices.values()), edges))
    out = Layout({}, {}, {}, {})
    left = 0.0
    for index, comp in enumerate(components):
        sug = _Sugiyama(comp)
        sug.xspace, sug.yspace = 16, 32
        sug.dw, sug.dh = 8, 8  # dummy vertices (the bends of long edges) stay thin
        sug.init_all(optimize=True)  # optimize: inputs sit just above their first user
        # what SugiyamaLayout.draw() does, with the clusters grouped before placement
        for _ in sug.ordering_step():
            pass
        for _ in sug.ordering_step(oneway=True):
            pass
        _group_clusters(sug, cluster_of)
        sug.setxy()
        _separate(sug)
        sug.draw_edges()
        views = {v.data: v.view for v in comp.sV}
        bends = {(e.v[0].data, e.v[1].data): e.view.pts[1:-1] for e in comp.sE}
        corners = [(x - w.w / 2, y - w.h / 2) for w in views.values() for x, y in [w.xy]]
        corners += [(x + w.w / 2, y + w.h / 2) for w in views.values() for x, y in [w.xy]]
        corners += [p for pts in bends.values() for p in pts]
        dx = left - min(x for x, _ in corners)  # to the right of the last component
        dy = -min(y for _, y in corners)  # top at 0
        for v in comp.sV:
            x, y = v.view.xy
            row = (index, sug.grx[v].rank)
            out.centres[v.data] = (x + dx, y + dy)
            out.rows[v.data] = row
            top, bottom = out.bands.get(row, (math.inf, -math.inf))
            out.bands[row] = (min(top, y + dy - v.view.h / 2), max(bottom, y + dy + v.view.h / 2))
        for key, pts in bends.items():
            out.bends[key] = [(x + dx, y + dy) for x, y in pts]
        left = max(x for x, _ in corners) + dx + 3 * sug.xspace
    return out


class Outline(NamedTuple):
    points: list[Point]
    labelled: bool  # False where it carries on, shifted sideways, from the outline above


def cluster_outlines(
    lay: Layout, names: Sequence[str], sizes: dict[str, tuple[float, float]]
) -> list[Outline]:
    """Dashed outlines around one cluster's nodes, each a polygon of stacked per-layer boxes.

    `_group_clusters` made the members adjacent in each layer, so a box around a layer's
    members holds no other node; the boxes of consecutive layers join into one outline where
    they overlap, and start a new outline where they do not.
    """
    members = set(names)
    spans: dict[tuple[int, int], list[float]] = {}

    def cover(row: tuple[int, int], x0: float, x1: float) -> None:
        lo, hi = spans.get(row, [math.inf, -math.inf])
        spans[row] = [min(lo, x0 - PAD), max(hi, x1 + PAD)]

    for n in members:
        cover(lay.rows[n], lay.centres[n][0] - sizes[n][0] / 2, lay.centres[n][0] + sizes[n][0] / 2)
    for (u, v), pts in lay.bends.items():  # an edge inside the cluster keeps its bends inside
        if u in members and v in members:
            (comp, ru), rv = lay.rows[u], lay.rows[v][1]
            step = 1 if rv > ru else -1
            for i, (x, _) in enumerate(pts, 1):
                cover((comp, ru + i * step), x - 4, x + 4)
    pieces: list[list[tuple[tuple[int, int], list[float]]]] = []
    for row, span in sorted(spans.items()):
        last = pieces[-1][-1] if pieces else None
        joins = (
            last is not None
            and last[0] == (row[0], row[1] - 1)
            and span[0] < last[1][1]
            and last[1][0] < span[1]
        )
        if joins:
            pieces[-1].append((row, span))
        else:
            pieces.append([(row, span)])
    outlines = []
    for i, piece in enumerate(pieces):
        (comp, rank), _ = piece[0]
        labelled = i == 0 or pieces[i - 1][-1][0] != (comp, rank - 1)
        # horizontal edges: above the first layer (with room for the label), midway between
        # layers, and below the last
        ys = [lay.bands[piece[0][0]][0] - PAD - (CLUSTER_SIZE + 4 if labelled else 0)]
        ys += [(lay.bands[a][1] + lay.bands[b][0]) / 2 for (a, _), (b, _) in zip(piece, piece[1:])]
        ys.append(lay.bands[piece[-1][0]][1] + PAD)
        right, left = [], []
        for j, (_, (x0, x1)) in enumerate(piece):
            right += [(x1, ys[j]), (x1, ys[j + 1])]
            left += [(x0, ys[j]), (x0, ys[j + 1])]
        outlines.append(Outline(right + left[::-1], labelled))
    return outlines


def _boundary(centre: Point, size: tuple[float, float], shape: str, toward: Point) -> Point:
    """Where the line from a node's centre toward `toward` leaves the node's outline."""
    (cx, cy), (hw, hh) = centre, (size[0] / 2, size[1] / 2)
    dx, dy = toward[0] - cx, toward[1] - cy
    if dx == 0 and dy == 0:
        return centre
    if shape == "ellipse":
        t = 1 / math.hypot(dx / hw, dy / hh)
    else:  # boxes, and octagons near enough
        t = min(hw / abs(dx) if dx else math.inf, hh / abs(dy) if dy else math.inf)
    t = min(t, 1.0)
    return cx + t * dx, cy + t * dy


def _path(pts: Sequence[Point]) -> str:
    """An SVG path through `pts`, its bends rounded by quadratic curves through the midpoints."""
    d = [f"M{_num(pts[0][0])},{_num(pts[0][1])}"]
    for (x0, y0), (x1, y1) in zip(pts[1:-1], pts[2:]):
        d.append(f"Q{_points([(x0, y0), ((x0 + x1) / 2, (y0 + y1) / 2)])}")
    d.append(f"L{_points([pts[-1]])}")
    return " ".join(d)


def _octagon(cx: float, cy: float, hw: float, hh: float) -> list[Point]:
    k = hh * 0.6
    return [
        (cx - hw + k, cy - hh), (cx + hw - k, cy - hh), (cx + hw, cy - hh + k),
        (cx + hw, cy + hh - k), (cx + hw - k, cy + hh), (cx - hw + k, cy + hh),
        (cx - hw, cy + hh - k), (cx - hw, cy - hh + k),
    ]  # fmt: skip


def _tag_node(el: ET.Element, data: dict) -> None:
    el.set("data-peftc-role", data["role"])
    if data.get("site_op"):
        el.set("data-peftc-site", data["site_op"])


def _node(
    parent: ET.Element, name: str, data: dict, centre: Point, size: tuple[float, float]
) -> None:
    grp = _el(parent, "g", id=name, **{"class": "node"})
    _tag_node(grp, data)
    _el(grp, "title", name)
    role = colour_role(data)
    shape = node_shape(data)
    (cx, cy), hw, hh = centre, size[0] / 2, size[1] / 2
    style = {"fill": COLOURS[role], "stroke": "black"}
    if data.get("site_op"):
        style["stroke_width"] = 3
    if shape == "ellipse":
        _el(grp, "ellipse", cx=cx, cy=cy, rx=hw, ry=hh, **style)
    elif shape == "doubleoctagon":
        _el(grp, "polygon", points=_points(_octagon(cx, cy, hw, hh)), fill="none", stroke="black")
        _el(grp, "polygon", points=_points(_octagon(cx, cy, hw - 4, hh - 4)), **style)
    else:
        corners = [(cx - hw, cy - hh), (cx + hw, cy - hh), (cx + hw, cy + hh), (cx - hw, cy + hh)]
        _el(grp, "polygon", points=_points(corners), **style)
    lines = node_label(name, data).split("\n")
    for i, line in enumerate(lines):
        y = cy + (i - (len(lines) - 1) / 2) * LINE + FONT_SIZE * 0.35  # baseline, centred
        _el(
            grp, "text", line, text_anchor="middle", x=cx, y=y, font_family=FONT,
            font_size=FONT_SIZE, fill=FONT_COLOURS.get(role, "#000000"),
        )  # fmt: skip


def _edge(parent: ET.Element, u: str, v: str, pts: list[Point]) -> None:
    """The edge's path, shortened by the arrowhead, and the arrowhead ending on the outline."""
    (x0, y0), (x1, y1) = pts[-2], pts[-1]
    length = math.hypot(x1 - x0, y1 - y0) or 1.0
    ux, uy = (x1 - x0) / length, (y1 - y0) / length
    base = (x1 - ux * ARROW, y1 - uy * ARROW)
    half = ARROW * 0.35
    head = [
        (x1, y1),
        (base[0] - uy * half, base[1] + ux * half),
        (base[0] + uy * half, base[1] - ux * half),
    ]
    grp = _el(parent, "g", id=f"{u}->{v}", **{"class": "edge"})
    _el(grp, "title", f"{u}->{v}")
    _el(grp, "path", fill="none", stroke=EDGE_COLOUR, d=_path([*pts[:-1], base]))
    _el(grp, "polygon", fill=EDGE_COLOUR, stroke=EDGE_COLOUR, points=_points(head))


def draw_svg(g: nx.DiGraph, title: str = "peftc", legend: bool = True) -> str:
    """The graph as SVG text, laid out in pure Python (nodes need `program_graph`'s attributes)."""
    shapes = {n: node_shape(d) for n, d in g.nodes(data=True)}
    sizes = {n: _size(node_label(n, d).split("\n"), shapes[n]) for n, d in g.nodes(data=True)}
    lay = layout(g, sizes) if len(g) else Layout({}, {}, {}, {})
    centres = lay.centres
    svg = ET.Element(_t("svg"), {"data-peftc-layout": "grandalf"})
    graph = _el(svg, "g", id="graph0", **{"class": "graph"})
    _el(graph, "title", title)
    background = _el(graph, "rect", fill="white", stroke="none")  # sized at the end
    # everything is drawn where the layout put it; the canvas is fitted around it at the end
    xs = [c[0] + s * sizes[n][0] / 2 for n, c in centres.items() for s in (-1, 1)] or [0.0]
    ys = [c[1] + s * sizes[n][1] / 2 for n, c in centres.items() for s in (-1, 1)] or [0.0]
    for path, names in cluster_members(g).items():
        grp = _el(graph, "g", id=f"cluster:{path}", **{"class": "cluster"})
        grp.set("data-peftc-site", path)
        _el(grp, "title", f"cluster:{path}")
        for outline, labelled in cluster_outlines(lay, names, sizes):
            _el(grp, "polygon", fill="none", stroke=COLOURS[ADAPTER], stroke_dasharray="5,2",
                points=_points(outline))  # fmt: skip
            if labelled:
                x0, x1, y0 = outline[0][0], outline[-1][0], outline[0][1]  # its first layer
                _el(
                    grp, "text", path, text_anchor="middle", x=(x0 + x1) / 2,
                    y=y0 + CLUSTER_SIZE + 2, font_family=FONT, font_size=CLUSTER_SIZE,
                )  # fmt: skip
            xs += [x for x, _ in outline]
            ys += [y for _, y in outline]
    for u, v in g.edges():
        pts = [centres[u], *lay.bends.get((u, v), []), centres[v]]
        pts[0] = _boundary(centres[u], sizes[u], shapes[u], pts[1])
        pts[-1] = _boundary(centres[v], sizes[v], shapes[v], pts[-2])
        _edge(graph, u, v, pts)
    for name, data in g.nodes(data=True):
        _node(graph, name, data, centres[name], sizes[name])
    top = min(ys) - TITLE_SIZE - 8
    x0, y0 = min(xs) - MARGIN, top - MARGIN
    w = max(max(xs) + MARGIN - x0, CHAR * 1.3 * len(title) + 2 * MARGIN)
    h = max(ys) + MARGIN - y0
    _el(
        graph, "text", title, text_anchor="middle", x=x0 + w / 2, y=top + TITLE_SIZE,
        font_family=FONT, font_size=TITLE_SIZE,
    )  # fmt: skip
    for key, value in (("x", x0), ("y", y0), ("width", w), ("height", h)):
        background.set(key, _num(value))
    _set_canvas(svg, x0, y0, w, h)
    if legend:
        add_legend(svg)
    return ET.tostring(svg, encoding="unicode")


def _set_canvas(svg: ET.Element, x0: float, y0: float, w: float, h: float) -> None:
    # one user unit is one point, as in Graphviz's SVG
    svg.set("width", f"{math.ceil(w)}pt")
    svg.set("height", f"{math.ceil(h)}pt")
    svg.set("viewBox", " ".join(_num(float(x)) for x in (x0, y0, w, h)))


def add_legend(svg: ET.Element) -> None:
    """Add the colour key below the picture, and grow the canvas to fit it."""
    x0, y0, w, h = (float(x) for x in svg.get("viewBox", "0 0 0 0").replace(",", " ").split())
    grp = _el(svg, "g", **{"class": "legend"})
    _el(grp, "title", LEGEND)
    strip = _el(grp, "rect", x=x0, y=y0 + h, height=22.0, fill="white")  # width set below
    x, y = x0 + MARGIN, y0 + h + 4
    items = [(COLOURS[role], 1, label, role) for role, label in LEGEND_ITEMS]
    items.append(("#ffffff", 3, "site op", None))
    for fill, width, label, role in items:
        swatch = _el(
            grp, "rect", x=x, y=y, width=14, height=10, fill=fill, stroke="black",
            stroke_width=width,
        )  # fmt: skip
        if role:
            swatch.set("data-peftc-role", role)
        _el(grp, "text", label, x=x + 19, y=y + 8.5, font_family=FONT, font_size=FONT_SIZE)
        x += 19 + CHAR * len(label) + 14
    width = max(w, x - x0 + MARGIN)
    strip.set("width", _num(width))
    _set_canvas(svg, x0, y0, width, h + 22)


def tag_graphviz_svg(svg: bytes | str, g: nx.DiGraph, legend: bool = True) -> str:
    """Graphviz's SVG of `to_dot(g)`, tagged as the module docstring says (and without its
    XML prolog, DOCTYPE and comments, so it can be inlined in HTML as it is)."""
    root = ET.fromstring(svg)
    root.set("data-peftc-layout", "graphviz")
    for grp in root.iter(_t("g")):
        classes, name = grp.get("class", "").split(), grp.get("id", "")
        if "node" in classes and name in g:
            _tag_node(grp, g.nodes[name])
        elif "cluster" in classes and name.startswith("cluster:"):
            grp.set("data-peftc-site", name.removeprefix("cluster:"))
    if legend:
        add_legend(root)
    return ET.tostring(root, encoding="unicode")
