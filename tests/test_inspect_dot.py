"""DOT pictures: valid DOT (parsed by pydot and networkx), colours by node role, the --around
neighbourhood, and rendering through Graphviz (or the install hint when it is missing)."""

import networkx as nx
import pydot
import pytest
import torch

import peftc
from peftc.inspect.dot import COLOURS, to_dot
from peftc.inspect.graph import neighbourhood, program_graph, site_nodes
from peftc.inspect.render import GraphvizNotFound, inline_svg, render
from tests.models import tiny_llama, token_inputs

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
    fused = next(n for n in program.graph.nodes if n.meta.get("peftc", {}).get("site") == Q0)
    # the fusion pass's tag: one `site` string naming the fused sites, joined by commas
    fused.meta["peftc"] = {"site": f"{Q0},{V0}", "method": "fused", "role": "fused"}
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
        n.name
        for n in program.graph.nodes
        if Q0 in n.meta.get("peftc", {}).get("site", "").split(",")
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


def test_render_svg_and_png(adapted):
    g = program_graph(adapted.program())
    dot = to_dot(neighbourhood(g, site_nodes(g, Q0)[Q0], 1), "around q_proj")
    svg = inline_svg(render(dot, "svg"))
    assert svg.startswith("<svg") and svg.rstrip().endswith("</svg>")
    assert "<!DOCTYPE" not in svg and "<?xml" not in svg
    spliced = [n for n, d in g.nodes(data=True) if d["role"] != "base" and Q0 in d["sites"]]
    assert len(spliced) >= 4  # lora_A, lora_B, the B matmul and the add at least
    assert all(f">{name}</text>" in svg for name in [*spliced, "linear"])
    assert COLOURS["adapter"] in svg
    png = render(dot, "png")
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000
    with pytest.raises(ValueError, match="cannot render to 'gif'"):
        render(dot, "gif")


def test_missing_graphviz_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty folder: no `dot` on PATH
    with pytest.raises(GraphvizNotFound, match="apt-get install graphviz"):
        render("digraph { a -> b }", "svg")
