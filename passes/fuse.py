"""Fusion passes over adapter subgraphs.

- `fuse_siblings`: adapters whose first matmul reads the same input (q/k/v, gate/up, GPT-2's
  packed c_attn) become one matmul over the concatenated A matrices, then a split. The A
  tensors stay separate parameters (the cat is in the graph, Inductor folds it), so
  checkpoint keys do not change. Inputs behind dropout differ per site, so masks are never
  shared: such adapters simply do not group.
- `fold_scale`: `base + (h @ Bᵀ) · s` becomes `base + h @ (s·B)ᵀ` when B widens (a low-rank
  adapter's up-projection, [out, r] with r < out), else `add(base, h @ Bᵀ, alpha=s)`. Scaling the
  small weight, not the [tokens, out] output, leaves the output's gradient unscaled: the backward
  feeds the same tensor to the base's input-gradient matmul and to the adapter's, where a scaled
  copy made Inductor recompute the producer's pointwise work (RoPE's backward, SiLU's) for each.
- `drop_identity_dropout`: dropout with p = 0, or in eval mode, is removed.
"""

from __future__ import annotations

import operator
from collections import defaultdict

import torch
import torch.fx

from rewrite.passes import PassResult, RuleSet, RuleStats
from rewrite.program import PARAMETER, Program
from rewrite.tags import FUSED, KEY, adapter_tag, tag_of

aten = torch.ops.aten


def _adapter_node(node: torch.fx.Node) -> bool:
    return tag_of(node) is not None


class FuseSiblings:
    """Group adapter `linear(x, A_i)` nodes by their input x; fuse groups of two or more."""

    name = "fuse_siblings"
    requires: tuple[str, ...] = ("adapter_values",)  # the ranks come from the A matmuls' shapes
    ensures: tuple[str, ...] = ("lint",)

    def __init__(self) -> None:
        self.stats = {}

    def __call__(self, program: Program) -> PassResult:
        stats = RuleStats()
        self.stats = {"fuse_shared_input_matmuls": stats}
        params = {s.name for s in program.slots if s.kind == PARAMETER}
        groups: dict[torch.fx.Node, list[torch.fx.Node]] = defaultdict(list)
        for node in program.graph.nodes:
            if (
                node.op != "call_function"
                or node.target != aten.linear.default
                or not _adapter_node(node)
            ):
                continue
            x, weight = node.args[0], node.args[1]
            if len(node.args) > 2 and node.args[2] is not None:
                stats.declines["adapter matmul has a bias"] += 1
                continue
            if not isinstance(weight, torch.fx.Node) or weight.name not in params:
                continue  # a second (B) matmul or a derived weight: not a first-stage A matmul
            if _adapter_node(x):
                continue  # reads an adapter value (dropout output, A-stage result): per-site input
            groups[x].append(node)
        modified = False
        graph = program.graph
        order = {n: i for i, n in enumerate(graph.nodes)}
        for x, nodes in groups.items():
            if len(nodes) < 2:
                stats.declines["no sibling adapter reads this input"] += 1
                continue
            weights = [n.args[1] for n in nodes]
            ranks = [_rank_of(n) for n in nodes]
            first = min(nodes, key=order.__getitem__)
            tag = adapter_tag(tuple(s for n in nodes for s in tag_of(n)["sites"]), "fused", FUSED)
            with graph.inserting_before(first):
                cat = graph.call_function(aten.cat.default, (weights, 0))
                fused = graph.call_function(aten.linear.default, (x, cat))
                split = graph.call_function(aten.split_with_sizes.default, (fused, ranks, -1))
                parts = [
                    graph.call_function(operator.getitem, (split, i)) for i in range(len(nodes))
                ]
            for new in (cat, fused, split, *parts):
                new.meta[KEY] = adapter_tag(tag["sites"], tag["method"], tag["role"])
            for node, part in zip(nodes, parts, strict=True):
                node.replace_all_uses_with(part)
                graph.erase_node(node)
            stats.matches += 1
            modified = True
        if modified:
            program.recompile()
        return PassResult(program.graph_module, modified)


def _rank_of(node: torch.fx.Node) -> int:
    """The output width of an adapter A matmul, from the snippet's traced shape."""
    return int(node.meta["val"].shape[-1])


class FoldScaleRule:
    """Pattern: add(base, mul(adapter matmul, s)) with a scalar s. Rewrite: add(..., alpha=s)."""

    name = "fold_scale_into_add"

    def matches(self, node: torch.fx.Node) -> bool:
        return (
            node.op == "call_function"
            and node.target == aten.add.Tensor
            and _adapter_node(node)
            and len(node.args) == 2
            and isinstance(node.args[1], torch.fx.Node)
            and node.args[1].target == aten.mul.Tensor
        )

    def check(self, node: torch.fx.Node) -> str | None:
        mul = node.args[1]
        if not isinstance(mul.args[1], int | float):
            return "scale is a tensor, not a constant"
        if len(mul.users) != 1:
            return "scaled value has other users"
        if node.kwargs.get("alpha", 1) != 1:
            return "add already has an alpha"
        if not isinstance(mul.args[0], torch.fx.Node) or mul.args[0].target not in (
            aten.linear.default,
            aten.conv1d.default,
            aten.conv2d.default,
            aten.matmul.default,
        ):
            return "scaled value is not a matmul"
        return None

    def rewrite(self, node: torch.fx.Node) -> None:
        mul = node.args[1]
        node.args = (node.args[0], mul.args[0])
        node.kwargs = {**node.kwargs, "alpha": mul.args[1]}
        node.graph.erase_node(mul)


class ScaleWideningWeightRule(FoldScaleRule):
    """Pattern: as FoldScaleRule, where the matmul is a bias-free linear, read only by the scale,
    whose [out, in] weight widens (in < out: a low-rank adapter's B). Rewrite: base + linear(h,
    mul(B, s)), scaling the weight, which has fewer values than the [tokens, out] output."""

    name = "scale_widening_weight"

    def matches(self, node: torch.fx.Node) -> bool:
        # FoldScaleRule's declines are its own to count, so a declined node is no match here
        if not super().matches(node) or super().check(node) is not None:
            return False
        matmul = node.args[1].args[0]
        if not isinstance(matmul, torch.fx.Node) or matmul.target != aten.linear.default:
            return False
        if len(matmul.users) != 1 or (len(matmul.args) > 2 and matmul.args[2] is not None):
            return False
        h = matmul.args[0]
        width_in = h.meta.get("val") if isinstance(h, torch.fx.Node) else None
        width_out = matmul.meta.get("val")
        if width_in is None or width_out is None:
            return False  # the snippet's traced shapes say whether the weight widens
        return width_in.shape[-1] < width_out.shape[-1]

    def check(self, node: torch.fx.Node) -> str | None:
        return None  # matches() holds FoldScaleRule's checks

    def rewrite(self, node: torch.fx.Node) -> None:
        mul = node.args[1]
        matmul, scale = mul.args
        with node.graph.inserting_before(matmul):
            scaled = node.graph.call_function(aten.mul.Tensor, (matmul.args[1], scale))
        out, h = matmul.meta["val"], matmul.args[0].meta["val"]
        scaled.meta = {KEY: dict(tag_of(matmul)), "val": out.new_empty(out.shape[-1], h.shape[-1])}
        matmul.args = (matmul.args[0], scaled)
        node.args = (node.args[0], matmul)
        node.graph.erase_node(mul)


class DropIdentityDropoutRule:
    """Pattern: an adapter's dropout. Rewrite: its input, when p = 0 or in eval mode."""

    name = "drop_identity_dropout"

    def matches(self, node: torch.fx.Node) -> bool:
        return (
            node.op == "call_function"
            and node.target == aten.dropout.default
            and _adapter_node(node)
        )

    def check(self, node: torch.fx.Node) -> str | None:
        p, train = node.args[1], node.args[2]
        if p > 0 and train:
            return "dropout is live (p > 0 in training)"
        return None

    def rewrite(self, node: torch.fx.Node) -> None:
        node.replace_all_uses_with(node.args[0])
        node.graph.erase_node(node)


def fold_scale() -> RuleSet:
    return RuleSet(
        "fold_scale", [ScaleWideningWeightRule(), FoldScaleRule(), DropIdentityDropoutRule()]
    )
