"""Merge: fold each adapter into its base weight, so the graph is the base model's again.

Each adapted site's op is fed `merged_weight(W, p)` (and `merged_bias`, where the method
changes the bias) and the adapter snippet is dropped.
Merging runs in fp32 and casts once to the weight's dtype (or a requested one). A weight shared
by several sites (tied embeddings) gets a merged copy of its own under `<site path>.weight`.
Slices of a packed projection merge into their rows of the one weight (keyed by the whole
site's path, `Site.owner`); the rows no slice adapts stay the base weight's exactly.

Guarantee: after merge and cleanup, the graph's op multiset (`op_multiset`) equals that of the
base model's own eval trace after the same dead-code cleanup; the merged model costs exactly
what the base model costs. `FoldWeights` is the
same fold applied to a base program that never had adapters (e.g. one traced in fp16).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping

import torch
import torch.fx

from passes.cleanup import Cleanup
from rewrite.names import (
    PREFIX,
    logical_weight,
    param_target,
    site_bias,
    stored_weight,
    whole_weight,
)
from rewrite.passes import PassManager, PassResult
from rewrite.program import PARAMETER, Program
from rewrite.sites import SITE_OPS, Site, SiteIndex
from rewrite.spec import Assignment
from rewrite.tags import tag_of


class MergeError(RuntimeError):
    """An adapter cannot be folded into its weight; the message names the method and site."""


def merged_weights(
    assignments: list[Assignment],
    state: Mapping[str, torch.Tensor],
    safe: bool = True,
    dtype: torch.dtype | None = None,
) -> dict[str, torch.Tensor]:
    """whole site path (`Site.owner`) -> merged weight in storage layout, computed in fp32
    and cast once to `dtype` (default: the weight's own dtype). Merging in low precision drifts (peft#1388, #2502)."""
    out: dict[str, torch.Tensor] = {}
    for a in assignments:
        site, method = a.site, a.method
        W = state[site.weight]
        p = _fp32_params(method, site, state)
        with torch.no_grad():
            merged = method.merged_weight(site, logical_weight(site, W.detach().float()), p)
        if merged is None:
            why = method.unmergeable_reason or "its update depends on the input"
            raise MergeError(
                f"{method.name} at {site.path} cannot be merged: {why}. Export it unmerged instead."
            )
        if safe and not torch.isfinite(merged).all():
            raise MergeError(
                f"merging {method.name} at {site.path} gives NaN or Inf weights; the adapter "
                "weights are broken (check the learning rate), so nothing was merged"
            )
        if site.rows is not None:  # a slice: its rows of the whole weight, merged so far
            whole = out.get(site.owner)
            whole = whole_weight(site, W.detach().float()) if whole is None else whole
            merged = torch.cat([whole[: site.rows[0]], merged, whole[site.rows[1] :]])
        out[site.owner] = merged
    site_of = {a.site.owner: a.site for a in assignments}
    cast = {path: dtype or state[site.weight].dtype for path, site in site_of.items()}
    # back to the storage layout ([in, out] for addmm and x @ W), cast once
    return {
        path: stored_weight(site_of[path], merged).to(cast[path]).contiguous()
        for path, merged in out.items()
    }


def merged_biases(
    assignments: list[Assignment],
    state: Mapping[str, torch.Tensor],
    dtype: torch.dtype | None = None,
) -> dict[str, torch.Tensor]:
    """whole site path -> merged bias, for the sites whose method changes the bias
    (`Method.merged_bias`); computed in fp32 and cast once, like the weights."""
    out: dict[str, torch.Tensor] = {}
    cast: dict[str, torch.dtype] = {}
    for a in assignments:
        site, method = a.site, a.method
        if site.bias is None:
            continue
        p = _fp32_params(method, site, state)
        W = logical_weight(site, state[site.weight].detach().float())
        b = state[site.bias]
        with torch.no_grad():
            merged = method.merged_bias(site, W, site_bias(site, b.detach().float()), p)
        if merged is None:
            continue
        if site.rows is not None:  # a slice: its entries of the whole bias, merged so far
            whole = out.get(site.owner, b.detach().float())
            merged = torch.cat([whole[: site.rows[0]], merged, whole[site.rows[1] :]])
        out[site.owner] = merged
        cast[site.owner] = dtype or b.dtype
    return {path: merged.to(cast[path]).contiguous() for path, merged in out.items()}


def _fp32_params(method, site: Site, state: Mapping[str, torch.Tensor]) -> dict:
    """A site's adapter tensors, the floating ones in fp32 (index tensors stay integers)."""
    out = {}
    for name in method.params(site):
        t = state[param_target(method, site, name)].detach()
        out[name] = t.float() if t.is_floating_point() else t
    return out


class MergeAdapters:
    """Reroute each adapter output to its base op, fed by a merged weight placeholder."""

    name = "merge_adapters"
    requires: tuple[str, ...] = ()
    ensures: tuple[str, ...] = ("lint", "no_adapters")

    def __init__(
        self,
        assignments: list[Assignment],
        merged: Mapping[str, torch.Tensor],
        biases: Mapping[str, torch.Tensor] | None = None,
    ):
        self.by_path = {a.site.path: a for a in assignments}
        self.merged = merged
        self.biases = biases or {}
        self.state: dict[str, torch.Tensor] = {}

    def __call__(self, program: Program) -> PassResult:
        graph = program.graph
        nodes = {n.name: n for n in graph.nodes}
        owners = {a.site.owner: a.site for a in self.by_path.values()}
        weight_uses = Counter(site.weight for site in owners.values())
        param_names = {s.name: s.target for s in program.slots if s.kind == PARAMETER}
        users_of_weight = Counter()
        for n in graph.nodes:
            if n.op == "placeholder" and n.name in param_names:
                users_of_weight[param_names[n.name]] = len(
                    [u for u in n.users if tag_of(u) is None]
                )
        modified = False
        fed: set[torch.fx.Node] = set()  # base ops given their merged weight (once for slices)
        for out in [n for n in graph.nodes if (tag_of(n) or {}).get("output")]:
            tag = tag_of(out)
            (path,) = tag["sites"]
            base = nodes[tag["base"]]
            out.replace_all_uses_with(base)
            modified = True
            if base in fed:
                continue
            fed.add(base)
            site = self.by_path[path].site
            owner = site.owner
            shared = weight_uses[site.weight] > 1 or users_of_weight[site.weight] > 1
            target = f"{owner}.weight" if shared else site.weight
            if shared:
                _read_weight(base, site, program.add_parameter(target))
            self.state[target] = self.merged[owner]
            _ungroup_if_dense(base, site, self.merged[owner])
            if owner in self.biases:
                self.state[_feed_bias(program, base, site, owner)] = self.biases[owner]
        graph.eliminate_dead_code()
        for slot in list(program.slots):
            if slot.kind == PARAMETER:
                node = program.placeholder(slot.name)
                if not node.users and slot.target.startswith(PREFIX):
                    graph.erase_node(node)
                    program.slots.remove(slot)
        program.recompile()
        return PassResult(program.graph_module, modified)


def _read_weight(node: torch.fx.Node, site: Site, placeholder: torch.fx.Node) -> None:
    """Point a site op at another weight placeholder (through its t() for linear(x, t(W)))."""
    w_index = SITE_OPS[site.op].weight
    holder, index = (node.args[w_index], 0) if site.transposed else (node, w_index)
    args = list(holder.args)
    args[index] = placeholder
    holder.args = tuple(args)


def _feed_bias(program: Program, node: torch.fx.Node, site: Site, owner: str) -> str:
    """Point a site op at its merged bias; returns the state name that holds it (the bias's
    own, unless the bias parameter feeds other ops too)."""
    index = SITE_OPS[site.op].bias
    old = node.args[index]
    own = len(old.users) == 1 and program.slot_for(old) is not None
    target = site.bias if own else f"{owner}.merged_bias"
    if not own:
        args = list(node.args)
        args[index] = program.add_parameter(target)
        node.args = tuple(args)
    return target


def _ungroup_if_dense(node: torch.fx.Node, site: Site, merged: torch.Tensor) -> None:
    """A grouped conv whose merged weight is dense (LoRA's update reaches every input
    channel) runs ungrouped from here on: groups=1 in its aten.conv1d/conv2d arguments
    (input, weight, bias, stride, padding, dilation, groups), defaults filled in."""
    if site.conv is None or site.conv.groups == 1 or merged.shape[1] != site.in_features:
        return
    dims = len(site.conv.kernel)
    defaults = (None, None, None, [1] * dims, [0] * dims, [1] * dims, 1)
    full = list(node.args) + list(defaults[len(node.args) :])
    full[6] = 1
    node.args = tuple(full)


def op_multiset(graph: torch.fx.Graph | torch.fx.GraphModule) -> Counter:
    """How often each op target is called: the structural fingerprint merge must preserve."""
    if isinstance(graph, torch.fx.GraphModule):
        graph = graph.graph
    return Counter(str(n.target) for n in graph.nodes if n.op == "call_function")


class FoldWeights:
    """Feed each assigned site of a base program (no adapters) its merged weight."""

    name = "fold_weights"
    requires: tuple[str, ...] = ("no_adapters",)
    ensures: tuple[str, ...] = ("lint",)

    def __init__(self, sites: SiteIndex, assignments: list[Assignment], merged, biases=None):
        self.sites = sites
        self.assignments = assignments
        self.merged = merged
        self.biases = biases or {}
        self.state: dict[str, torch.Tensor] = {}

    def __call__(self, program: Program) -> PassResult:
        param_of = {s.name: s.target for s in program.slots if s.kind == PARAMETER}
        uses = Counter()
        for n in program.graph.nodes:
            if n.op == "placeholder" and n.name in param_of:
                uses[param_of[n.name]] = len(n.users)
        # the whole sites the plan merges into (a packed projection's slices: one weight)
        owners = list(dict.fromkeys(a.site.owner for a in self.assignments))
        for owner in owners:
            if owner not in self.sites.sites:
                raise MergeError(
                    f"site {owner} of the plan is missing from the re-traced base graph; "
                    "the model's structure changed since it was compiled"
                )
        claimed = Counter(self.sites[owner].weight for owner in owners)
        for owner in owners:
            site, nodes = self.sites[owner], self.sites.nodes[owner]
            shared = claimed[site.weight] > 1 or uses[site.weight] > len(nodes)
            target = f"{owner}.weight" if shared else site.weight
            if shared:
                placeholder = program.add_parameter(target)
                for node in nodes:
                    _read_weight(node, site, placeholder)
            self.state[target] = self.merged[owner]
            for node in nodes:
                _ungroup_if_dense(node, site, self.merged[owner])
            if owner in self.biases:
                for node in nodes:
                    self.state[_feed_bias(program, node, site, owner)] = self.biases[owner]
        program.recompile()
        return PassResult(program.graph_module, bool(self.assignments))


def fold_weights(
    program: Program,
    sites: SiteIndex,
    assignments: list[Assignment],
    state: Mapping[str, torch.Tensor],
    merged: Mapping[str, torch.Tensor],
    biases: Mapping[str, torch.Tensor] | None = None,
) -> tuple[Program, dict[str, torch.Tensor]]:
    """`program` (a base trace, rewritten in place) with merged weights (and the biases that
    change) folded in, and the state it then reads (tensors of its own)."""
    fold = FoldWeights(sites, assignments, merged, biases)
    PassManager([fold, Cleanup()]).run(program)
    with torch.no_grad():
        owned = {k: v.detach().clone() for k, v in {**state, **fold.state}.items()}
    return program, owned
