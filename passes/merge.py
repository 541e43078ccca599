"""Merge: fold each adapter into its base weight, so the graph is the base model's again.

Each adapted site's op is fed `merged_weight(W, p)` and the adapter snippet is dropped.
Merging runs in fp32 and casts once to the weight's dtype. A weight shared by several
sites (tied embeddings) gets a merged copy of its own under `<site path>.weight`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping

import torch
import torch.fx

from passes.adapters.insert import PREFIX, logical_weight, param_target
from rewrite.passes import PassResult
from rewrite.program import PARAMETER, Program
from rewrite.sites import SITE_OPS
from rewrite.spec import Assignment


class MergeError(RuntimeError):
    """An adapter cannot be folded into its weight; the message names the method and site."""


def merged_weights(
    assignments: list[Assignment], state: Mapping[str, torch.Tensor], safe: bool = True
) -> dict[str, torch.Tensor]:
    """site path -> merged weight in storage layout and dtype."""
    out = {}
    for a in assignments:
        site, method = a.site, a.method
        W = state[site.weight]
        p = {
            name: state[param_target(method, site, name)].detach().float()
            for name in method.params(site)
        }
        with torch.no_grad():
            merged = method.merged_weight(site, logical_weight(site, W.detach().float()), p)
        if merged is None:
            why = getattr(method, "unmergeable_reason", "its update depends on the input")
            raise MergeError(
                f"{method.name} at {site.path} cannot be merged: {why}. Export it unmerged instead."
            )
        if safe and not torch.isfinite(merged).all():
            raise MergeError(
                f"merging {method.name} at {site.path} gives NaN or Inf weights; the adapter "
                "weights are broken (check the learning rate), so nothing was merged"
            )
        if site.op == "addmm":
            merged = merged.t()
        out[site.path] = merged.to(W.dtype).contiguous()
    return out


class MergeAdapters:
    """Reroute each adapter output to its base op, fed by a merged weight placeholder."""

    name = "merge_adapters"
    requires: tuple[str, ...] = ()

    def __init__(self, assignments: list[Assignment], merged: Mapping[str, torch.Tensor]):
        self.by_path = {a.site.path: a for a in assignments}
        self.merged = merged
        self.state: dict[str, torch.Tensor] = {}

    def __call__(self, program: Program) -> PassResult:
        graph = program.graph
        nodes = {n.name: n for n in graph.nodes}
        weight_uses = Counter(a.site.weight for a in self.by_path.values())
        param_names = {s.name: s.target for s in program.slots if s.kind == PARAMETER}
        users_of_weight = Counter()
        for n in graph.nodes:
            if n.op == "placeholder" and n.name in param_names:
                users_of_weight[param_names[n.name]] = len(
                    [u for u in n.users if not u.meta.get("peftc")]
                )
        modified = False
        for out in [n for n in graph.nodes if n.meta.get("peftc", {}).get("output")]:
            tag = out.meta["peftc"]
            a = self.by_path[tag["site"]]
            base = nodes[tag["base"]]
            site = a.site
            _, w_index, _ = SITE_OPS[site.op]
            shared = weight_uses[site.weight] > 1 or users_of_weight[site.weight] > 1
            target = f"{site.path}.weight" if shared else site.weight
            if shared:
                args = list(base.args)
                args[w_index] = program.add_parameter(target)
                base.args = tuple(args)
            self.state[target] = self.merged[site.path]
            out.replace_all_uses_with(base)
            modified = True
        graph.eliminate_dead_code()
        for slot in list(program.slots):
            if slot.kind == PARAMETER:
                node = program.placeholder(slot.name)
                if not node.users and slot.target.startswith(PREFIX):
                    graph.erase_node(node)
                    program.slots.remove(slot)
        graph.lint()
        program.graph_module.recompile()
        return PassResult(program.graph_module, modified)
