"""Render graphs to pictures. SVG comes from Graphviz's `dot` when it is installed and from
peftc's own pure-Python layout (`peftc.inspect.svg`) otherwise, tagged alike either way;
PNG needs Graphviz."""

from __future__ import annotations

import re
import shutil
import subprocess

import networkx as nx

from peftc.inspect.dot import to_dot
from peftc.inspect.svg import draw_svg, tag_graphviz_svg

INSTALL_HINT = (
    "Graphviz's `dot` program is not installed, so the graph cannot be rendered. Install it "
    "with `apt-get install graphviz` (Debian/Ubuntu), `brew install graphviz` (macOS) or "
    "`conda install graphviz`; meanwhile write the DOT text with `--dot graph.dot`, or SVG "
    "(drawn without Graphviz) with `--svg graph.svg`."
)
FORMATS = ("svg", "png")


class GraphvizNotFound(RuntimeError):
    """`dot` is not on PATH; the message says how to install it."""


class GraphvizTimeout(RuntimeError):
    """`dot` ran past its time limit (large graphs); the message says how to draw less."""


def dot_program() -> str | None:
    """The path of Graphviz's `dot`, or None."""
    return shutil.which("dot")


def render(dot_text: str, fmt: str = "svg", timeout: float = 300.0) -> bytes:
    """Lay out `dot_text` with Graphviz and return the picture as `fmt` bytes (svg or png)."""
    if fmt not in FORMATS:
        raise ValueError(f"cannot render to {fmt!r}; choose one of {', '.join(FORMATS)}")
    program = dot_program()
    if program is None:
        raise GraphvizNotFound(INSTALL_HINT)
    try:
        done = subprocess.run(
            [program, f"-T{fmt}"], input=dot_text.encode(), capture_output=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:  # run() has killed dot by now
        raise GraphvizTimeout(
            f"Graphviz's `dot` did not lay out the graph ({dot_text.count('->')} edges) within "
            f"{timeout:g} s and was stopped. Draw part of it with `--around GLOB` (the "
            "neighbourhood of the matching sites), write the DOT text with `--dot graph.dot` to "
            "lay it out yourself, or call render() with a larger timeout."
        ) from None
    if done.returncode != 0:
        raise RuntimeError(f"graphviz dot failed: {done.stderr.decode(errors='replace').strip()}")
    return done.stdout


def render_svg(g: nx.DiGraph, title: str = "peftc", legend: bool = True) -> str:
    """`g` (from `program_graph`) as SVG text that can be written to a file or inlined in HTML
    as it is. Graphviz lays it out when `dot` is on PATH, grandalf otherwise; the root's
    `data-peftc-layout` says which, and both tag nodes, edges and clusters alike."""
    if dot_program() is None:
        return draw_svg(g, title, legend)
    return tag_graphviz_svg(render(to_dot(g, title), "svg"), g, legend)


def inline_svg(svg: bytes | str) -> str:
    """An SVG document as an element to embed in HTML: no XML prolog, DOCTYPE or comments."""
    text = svg.decode() if isinstance(svg, bytes) else svg
    text = re.sub(r"<\?xml[^>]*\?>", "", text)
    text = re.sub(r"<!DOCTYPE[^>]*>", "", text)
    text = re.sub(r"<!--.*?-->", "", text, flags=re.S)
    return text.strip()
