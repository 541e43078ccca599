"""The rewritten FX graph as a networkx DiGraph, with each node's role, and site neighbourhoods.

Every FX node becomes a networkx node named like it, with edges from each input to its user.
A node's role says where it came from: `adapter` (spliced by the insertion pass, or an adapter
tensor placeholder), `fused` (made by a fusion pass) or `base` (the user's model). The walk
for `--around` uses networkx shortest paths; nodes that hold sizes rather than tensors
(sym_size and friends) are left out of the walk, since one of them feeds views in every layer
and would make any radius reach the whole model.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import networkx as nx
import torch
import torch.fx

from rewrite.names import PREFIX
from rewrite.program import Program
from rewrite.sites import find_sites
from rewrite.spec import path_matches
from rewrite.tags import ADAPTER, FUSED, tag_of  # noqa: F401 (node roles, beside BASE)

BASE = "base"


def short_target(node: torch.fx.Node) -> str:
    """`aten.linear.default` for ATen ops, the plain name otherwise."""
    if node.op in ("placeholder", "output", "get_attr"):
        return node.op
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        return str(target)  # aten.linear.default
    return getattr(target, "__name__", str(target))


def value_text(node: torch.fx.Node) -> str:
    """The shape and dtype of a node's value, like `[2, s0, 64] float32`, or '' if unknown."""
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor):
        dims = ", ".join(str(d) for d in val.shape)
        return f"[{dims}] {str(val.dtype).removeprefix('torch.')}"
    if isinstance(val, torch.SymInt | int | float | bool):
        return f"{type(val).__name__} {val}"
    if isinstance(val, list | tuple) and val and all(isinstance(v, torch.Tensor) for v in val):
        return "(" + ", ".join(f"[{', '.join(str(d) for d in v.shape)}]" for v in val) + ")"
    return ""


def _holds_tensor(node: torch.fx.Node) -> bool:
    """False for nodes whose value is a size or scalar (they join the graph's far corners)."""
    if node.op == "output":
        return False
    val = node.meta.get("val")
    return not isinstance(val, torch.SymInt | torch.SymFloat | torch.SymBool | int | float | bool)


def program_graph(program: Program) -> nx.DiGraph:
    """The program's graph as a DiGraph; node attributes: op, target, value, role, sites,
    site_op (the path of the base site this node computes, or None), walk (part of the walk)."""
    slot_target = {s.name: s.target for s in program.slots}
    base_sites = find_sites(program)
    site_of_node = {n.name: path for path, nodes in base_sites.nodes.items() for n in nodes}
    # where each site's adapter tensors are stored -> its path (a slice's brackets are not)
    owners = {s.state_path: s.path for s in base_sites.everything()}
    g = nx.DiGraph()
    for node in program.graph.nodes:
        tag = tag_of(node)
        role, sites = BASE, ()
        if tag:
            role, sites = tag["role"], tag["sites"]
        elif node.op == "placeholder" and slot_target.get(node.name, "").startswith(PREFIX):
            role = ADAPTER
            sites = _sites_of_tensor(slot_target[node.name], owners)
        g.add_node(
            node.name,
            op=node.op,
            target=short_target(node),
            value=value_text(node),
            role=role,
            sites=sites,
            site_op=site_of_node.get(node.name),
            state=slot_target.get(node.name) if node.op == "placeholder" else None,
            walk=_holds_tensor(node),
        )
        for inp in node.all_input_nodes:
            g.add_edge(inp.name, node.name)
    return g


def _sites_of_tensor(target: str, owners: Mapping[str, str]) -> tuple[str, ...]:
    """`adapters.<site state path>.<name>` -> (site path,); shared tensors belong to no one
    site."""
    rest = target[len(PREFIX) :]
    if rest.startswith("shared."):
        return ()
    owner = rest.rsplit(".", 1)[0]
    return (owners[owner],) if owner in owners else ()


def site_nodes(g: nx.DiGraph, pattern: str) -> dict[str, list[str]]:
    """Site path -> the nodes that make up that site (its base op and its adapter/fused nodes),
    for every site whose path matches `pattern` (a glob, or a dotted suffix like `q_proj`)."""
    out: dict[str, list[str]] = {}
    for name, data in g.nodes(data=True):
        paths = ([data["site_op"]] if data["site_op"] else []) + list(data["sites"])
        for path in paths:
            if path_matches(path, pattern):
                out.setdefault(path, []).append(name)
    if not out:
        known = sorted({d["site_op"] for _, d in g.nodes(data=True) if d["site_op"]})
        example = ", ".join(known[:3]) or "(this graph has no sites)"
        raise ValueError(
            f"no site matches {pattern!r}; give a glob over module paths such as "
            f"'*.layers.0.self_attn.q_proj' or a suffix such as 'q_proj' (paths here: {example}, ...)"
        )
    return out


def neighbourhood(g: nx.DiGraph, centers: Iterable[str], radius: int) -> nx.DiGraph:
    """The subgraph of nodes at most `radius` edges (either direction) from any center.

    The walk runs over tensor-valued nodes only (see the module docstring); centers always stay.
    """
    if radius < 0:
        raise ValueError(f"radius must be 0 or more, got {radius}")
    centers = list(centers)
    walk = nx.subgraph_view(g.to_undirected(as_view=True), filter_node=lambda n: g.nodes[n]["walk"])
    reached = nx.multi_source_dijkstra_path_length(
        walk, [c for c in centers if g.nodes[c]["walk"]], cutoff=radius
    )
    return g.subgraph(set(reached) | set(centers)).copy()
