"""Shared by the tests of graph pictures: pick the SVG layout engine, and read an SVG picture
back (nodes, edges, clusters, legend) through the tags `peftc.inspect.svg` gives both engines.

`render_svg` uses Graphviz when `dot` is on PATH, so the pure-Python path is forced by hiding
`dot` from `shutil.which`; the Graphviz path skips where `dot` is missing, saying how to get it.
"""

from __future__ import annotations

import re
import shutil
import xml.etree.ElementTree as ET
from dataclasses import dataclass

import pytest

ENGINES = ("grandalf", "graphviz")
NO_DOT = "Graphviz's dot is not installed (apt-get install graphviz); CI installs it"
NS = "{http://www.w3.org/2000/svg}"
SHAPES = (f"{NS}ellipse", f"{NS}polygon")


def use_engine(monkeypatch: pytest.MonkeyPatch, engine: str) -> None:
    """Make `render_svg` lay out with `engine` for the rest of the test."""
    if engine == "graphviz":
        if shutil.which("dot") is None:
            pytest.skip(NO_DOT)
        return
    which = shutil.which

    def no_dot(name, *args, **kwargs):
        return None if name == "dot" else which(name, *args, **kwargs)

    monkeypatch.setattr(shutil, "which", no_dot)


@dataclass
class Picture:
    """An SVG picture read back: its parts by the names the picture gives them."""

    layout: str  # which engine drew it
    nodes: dict[str, ET.Element]  # FX name -> its <g class="node">
    edges: dict[tuple[str, str], ET.Element]
    clusters: dict[str, ET.Element]  # site path -> its <g class="cluster">
    legend: ET.Element | None


def read_svg(text: str) -> Picture:
    """Parse `text` (it must be well-formed XML) and check each node's and edge's <title>."""
    root = ET.fromstring(text)  # fails unless the SVG is well-formed XML
    assert root.tag == f"{NS}svg"
    groups: dict[str, dict] = {"node": {}, "edge": {}, "cluster": {}, "legend": {}}
    for g in root.iter(f"{NS}g"):
        kind = g.get("class")
        if kind in groups:
            key = g.get("id") if kind != "edge" else tuple(g.get("id").split("->"))
            assert key not in groups[kind], f"two {kind}s named {key}"
            groups[kind][key] = g
    for name, g in groups["node"].items():
        assert g[0].tag == f"{NS}title" and g[0].text == name  # as in Graphviz's SVG
    for (u, v), g in groups["edge"].items():
        assert g[0].tag == f"{NS}title" and g[0].text == f"{u}->{v}"
    legends = list(groups["legend"].values())
    assert len(legends) <= 1
    return Picture(
        layout=root.get("data-peftc-layout"),
        nodes=groups["node"],
        edges=groups["edge"],
        clusters={g.get("data-peftc-site"): g for g in groups["cluster"].values()},
        legend=legends[0] if legends else None,
    )


def points(el: ET.Element) -> list[tuple[float, float]]:
    """A polygon's distinct corners, in order."""
    pts = [tuple(map(float, p.split(","))) for p in el.get("points").split()]
    return list(dict.fromkeys(pts))


def shapes(node: ET.Element) -> list[ET.Element]:
    """A node's outline elements (ellipse or polygons), not its text."""
    return [el for el in node.iter() if el.tag in SHAPES]


def box(node: ET.Element) -> tuple[float, float, float, float]:
    """x0, y0, x1, y1 of a node's outline."""
    xs, ys = [], []
    for el in shapes(node):
        if el.tag == f"{NS}ellipse":
            cx, cy, rx, ry = (float(el.get(k)) for k in ("cx", "cy", "rx", "ry"))
            xs += [cx - rx, cx + rx]
            ys += [cy - ry, cy + ry]
        else:
            xs += [x for x, _ in points(el)]
            ys += [y for _, y in points(el)]
    return min(xs), min(ys), max(xs), max(ys)


def centre(node: ET.Element) -> tuple[float, float]:
    x0, y0, x1, y1 = box(node)
    return (x0 + x1) / 2, (y0 + y1) / 2


def inside(point: tuple[float, float], polygon: list[tuple[float, float]]) -> bool:
    """Whether `point` is inside `polygon` (ray casting)."""
    x, y = point
    hit = False
    for (x0, y0), (x1, y1) in zip(polygon, polygon[1:] + polygon[:1]):
        if (y0 > y) != (y1 > y) and x < x0 + (y - y0) * (x1 - x0) / (y1 - y0):
            hit = not hit
    return hit


def path_start(edge: ET.Element) -> tuple[float, float]:
    """Where an edge's line starts (the M of its path)."""
    d = edge.find(f"{NS}path").get("d")
    m = re.match(r"\s*M\s*(-?[\d.]+)[ ,]+(-?[\d.]+)", d)
    assert m, d
    return float(m[1]), float(m[2])


def texts(el: ET.Element) -> list[str]:
    return [t.text for t in el.iter(f"{NS}text")]
