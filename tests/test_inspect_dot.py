"""DOT and SVG pictures: valid DOT (parsed by pydot and networkx), colours by node role, the
--around neighbourhood, SVG drawn alike by Graphviz and by the pure-Python layout, PNG through
Graphviz (or the install hint when it is missing)."""

import shutil

import networkx as nx
import pydot
import pytest
import torch

import peftc
from peftc.inspect.dot import COLOURS, cluster_members, colour_role, to_dot
from peftc.inspect.graph import neighbourhood, program_graph, site_nodes
from peftc.inspect.render import (
    GraphvizNotFound,
    GraphvizTimeout,
    inline_svg,
    render,
    render_svg,
)
from tests.models import tiny_llama, token_inputs
from tests.pictures import (
    ENGINES,
    NO_DOT,
    NS,
    box,
    centre,
    inside,
    path_start,
    points,
    read_svg,
    shapes,
    texts,
    use_engine,
)

# pydot's parser calls pyparsing names that newer pyparsing deprecates
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:pydot.dot_parser")

SPEC = {"adapters": [{"method": "lora", "targets": ["q_proj", "v_proj"], "rank": 4}]}
Q0 = "model.layers.0.self_attn.q_proj"
V0 = "model.layers.0.self_attn.v_proj"


@pytest.fixture(scope="module")
def adapted():
    return peftc.compile(tiny_llama(layers=1), SPEC, token_inputs())


def _parse(dot: str) -> pydot.Dot:
    graphs = pydot.graph_from_dot_data(dot)
    assert graphs is not None and len(graphs) == 1, "pydot could not parse the DOT text"
    return graphs[0]


def _attr(node: pydot.Node, key: str) -> str:
    return node.get_attributes()[key].strip('"')


def _nodes(parsed: pydot.Dot) -> dict[str, pydot.Node]:
    return {
        n.get_name().strip('"'): n
        for n in parsed.get_nodes()
        if n.get_name() not in ("node", "edge", "graph")
    }


def test_dot_is_valid_and_colours_nodes_by_role(adapted):
    program = adapted.program()
    dot = to_dot(program_graph(program))
    parsed = _parse(dot)
    nodes = _nodes(parsed)
    fx_nodes = list(program.graph.nodes)
    assert set(nodes) == {n.name for n in fx_nodes}
    adapter_params = {s.name for s in program.slots if s.target.startswith("adapters.")}
    assert len(adapter_params) == 4
    n_adapter = 0
    for node in fx_nodes:
        colour = _attr(nodes[node.name], "fillcolor")
        role = (node.meta.get("peftc") or {}).get("role")
        if role == "fused":  # made by the fusion pass, when the pipeline runs it
            assert colour == COLOURS["fused"], node.name
        elif node.meta.get("peftc") or node.name in adapter_params:
            assert colour == COLOURS["adapter"], node.name
            n_adapter += 1
        else:
            assert colour == COLOURS["base"], node.name
    assert n_adapter >= 2 * 2 + 4  # per site: B matmul and add at least, and 2 tensors
    # the site ops keep grey but get a thick outline
    assert _attr(nodes["linear"], "penwidth") == "3"
    # networkx reads it back with every edge of the FX graph
    g = nx.nx_pydot.from_pydot(parsed)
    edges = {(u, v) for u, v in g.edges()}
    expected = {(i.name, n.name) for n in fx_nodes for i in n.all_input_nodes}
    assert edges == expected


def test_fused_nodes_get_their_own_colour(adapted):
    program = adapted.program().clone()
    fused = next(n for n in program.graph.nodes if n.meta.get("peftc", {}).get("sites") == (Q0,))
    # the fusion pass's tag: one `site` string naming the fused sites, joined by commas
    fused.meta["peftc"] = {"sites": (Q0, V0), "method": "fused", "role": "fused"}
    g = program_graph(program)
    assert g.nodes[fused.name]["sites"] == (Q0, V0)
    assert fused.name in site_nodes(g, V0)[V0]
    nodes = _nodes(_parse(to_dot(neighbourhood(g, [fused.name], 1))))
    assert _attr(nodes[fused.name], "fillcolor") == COLOURS["fused"]
    assert _attr(nodes[fused.name], "peftc_role") == "fused"
    assert len({COLOURS["adapter"], COLOURS["fused"], COLOURS["base"]}) == 3


def _tensor_walk(program) -> nx.Graph:
    """The undirected data-flow graph over tensor-valued nodes, built here from FX directly."""
    g = nx.Graph()
    keep = {
        n.name
        for n in program.graph.nodes
        if n.op != "output" and not isinstance(n.meta.get("val"), torch.SymInt | int | float | bool)
    }
    g.add_nodes_from(keep)
    for n in program.graph.nodes:
        for i in n.all_input_nodes:
            if n.name in keep and i.name in keep:
                g.add_edge(n.name, i.name)
    return g


@pytest.mark.parametrize("radius", [0, 1, 3])
def test_around_keeps_the_site_and_nothing_beyond_the_radius(adapted, radius):
    program = adapted.program()
    full = program_graph(program)
    centers = site_nodes(full, f"*.layers.0.*.{Q0.rsplit('.', 1)[-1]}")[Q0]
    spliced = {
        n.name for n in program.graph.nodes if Q0 in n.meta.get("peftc", {}).get("sites", ())
    }
    assert "linear" in centers and spliced and spliced <= set(centers)
    sub = neighbourhood(full, centers, radius)
    drawn = set(_nodes(_parse(to_dot(sub))))
    assert set(centers) <= drawn
    dist = nx.multi_source_dijkstra_path_length(_tensor_walk(program), centers)
    assert all(dist[n] <= radius for n in drawn), "a node beyond the radius was drawn"
    within = {n for n, d in dist.items() if d <= radius}
    assert drawn == within
    assert any(d == radius + 1 for d in dist.values())  # there was more to cut off
    if radius == 0:
        assert drawn == set(centers)


def test_unknown_site_glob_is_a_clear_error(adapted):
    with pytest.raises(ValueError, match=r"no site matches '\*\.nope'.*paths here: lm_head"):
        site_nodes(program_graph(adapted.program()), "*.nope")
    with pytest.raises(ValueError, match="radius must be 0 or more"):
        neighbourhood(program_graph(adapted.program()), ["linear"], -1)


def _near(point, rect, tol=3.0):
    x, y = point
    x0, y0, x1, y1 = rect
    return x0 - tol <= x <= x1 + tol and y0 - tol <= y <= y1 + tol


@pytest.mark.parametrize("engine", ENGINES)
def test_svg_draws_every_node_edge_and_site_alike_with_either_engine(adapted, engine, monkeypatch):
    use_engine(monkeypatch, engine)
    g = program_graph(adapted.program())
    pic = read_svg(render_svg(g, "tiny llama"))
    assert pic.layout == engine
    assert set(pic.nodes) == set(g)
    for name, data in g.nodes(data=True):
        node = pic.nodes[name]
        assert node.get("data-peftc-role") == data["role"], name
        assert node.get("data-peftc-site") == data["site_op"], name
        outline = shapes(node)
        assert COLOURS[colour_role(data)] in {el.get("fill") for el in outline}, name
        assert texts(node)[0] == name
        if data["op"] in ("placeholder", "get_attr"):
            assert [el.tag for el in outline] == [f"{NS}ellipse"], name
        elif data["op"] == "output":
            assert [len(points(el)) for el in outline] == [8, 8], name  # a double octagon
        else:
            assert [len(points(el)) for el in outline] == [4], name  # a box
        widths = {el.get("stroke-width") for el in outline}
        assert widths == ({"3"} if data["site_op"] else {None}), name
    assert sum(1 for _, d in g.nodes(data=True) if d["site_op"]) >= 7  # every linear is a site
    # every edge is drawn from its source's outline, its arrowhead ending on its target's
    assert set(pic.edges) == set(g.edges())
    for (u, v), edge in pic.edges.items():
        assert _near(path_start(edge), box(pic.nodes[u])), (u, v)
        head = points(edge.find(f"{NS}polygon"))
        assert any(_near(p, box(pic.nodes[v])) for p in head), (u, v)
        # grandalf's layers draw data flow top to bottom (dot, keeping clusters together, may
        # draw an edge into or out of one flat or upward)
        if engine == "grandalf" and g.nodes[u]["walk"]:
            assert centre(pic.nodes[u])[1] < centre(pic.nodes[v])[1], (u, v)
    # no two nodes overlap
    boxes = sorted((box(n), name) for name, n in pic.nodes.items())
    for i, ((_, y0, x1, y1), a) in enumerate(boxes):
        for (p0, q0, _, q1), b in boxes[i + 1 :]:
            if p0 >= x1:  # sorted by left edge: no later box reaches back over this one
                break
            assert q0 >= y1 or q1 <= y0, f"{a} and {b} overlap"
    # each site's adapter nodes sit in a dashed box labelled with the site; no other node does
    members = cluster_members(g)
    assert set(members) == {Q0, V0} and set(pic.clusters) == set(members)
    for path, cluster in pic.clusters.items():
        outlines = [points(el) for el in cluster.iter(f"{NS}polygon")]
        assert outlines and all(el.get("stroke-dasharray") for el in cluster.iter(f"{NS}polygon"))
        assert path in texts(cluster)
        for name, node in pic.nodes.items():
            held = any(inside(centre(node), o) for o in outlines)
            assert held == (name in members[path]), (path, name)
    # the legend: one swatch per role colour, and the thick outline of a site op
    swatches = pic.legend.findall(f"{NS}rect[@stroke]")
    assert {
        r.get("data-peftc-role"): r.get("fill") for r in swatches if r.get("data-peftc-role")
    } == COLOURS
    assert any(r.get("stroke-width") == "3" for r in swatches)
    assert "site op" in texts(pic.legend)
    assert render_svg(g, "tiny llama", legend=False).count('class="legend"') == 0


def test_pure_python_svg_is_the_same_every_time(adapted, monkeypatch):
    use_engine(monkeypatch, "grandalf")
    g = program_graph(adapted.program())
    first = render_svg(g, "tiny llama")
    assert 'data-peftc-layout="grandalf"' in first
    assert render_svg(program_graph(adapted.program()), "tiny llama") == first


@pytest.mark.skipif(shutil.which("dot") is None, reason=NO_DOT)
def test_render_png_and_raw_svg_with_graphviz(adapted):
    g = program_graph(adapted.program())
    dot = to_dot(neighbourhood(g, site_nodes(g, Q0)[Q0], 1), "around q_proj")
    png = render(dot, "png")
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000
    svg = inline_svg(render(dot, "svg"))
    assert svg.startswith("<svg") and svg.rstrip().endswith("</svg>")
    assert "<!DOCTYPE" not in svg and "<?xml" not in svg


def test_render_rejects_unknown_formats():
    with pytest.raises(ValueError, match="cannot render to 'gif'; choose one of svg, png"):
        render("digraph { a -> b }", "gif")


def test_a_dot_that_runs_too_long_is_stopped_with_a_clear_error(monkeypatch, tmp_path):
    slow = tmp_path / "dot"  # a stand-in for dot on a graph too large to lay out in time
    slow.write_text("#!/bin/sh\nexec /bin/sleep 30\n")
    slow.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(GraphvizTimeout, match=r"\(1 edges\) within 0.5 s .* `--around GLOB`"):
        render("digraph { a -> b }", "png", timeout=0.5)


def test_missing_graphviz_says_how_to_install_and_svg_still_works(adapted, monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty folder: no `dot` on PATH
    with pytest.raises(GraphvizNotFound, match="apt-get install graphviz"):
        render("digraph { a -> b }", "png")
    g = program_graph(adapted.program())
    pic = read_svg(render_svg(neighbourhood(g, site_nodes(g, Q0)[Q0], 1)))
    assert pic.layout == "grandalf" and "linear" in pic.nodes
