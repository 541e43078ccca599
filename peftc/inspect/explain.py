"""Explain a site: its original node, the adapter subgraph spliced after it, its merged form,
the method's formula, its cost, and why the plan chose it (or why no rule did).

`explain(adapted, glob)` returns one `Explanation` per matching site, `format_explanation`
prints one. The merged form comes from `adapted.merge()`, computed once per call.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx

from passes.merge import MergeError, merged_weights
from peftc.inspect.graph import short_target, value_text
from rewrite.names import logical_weight, param_target
from rewrite.sites import SITE_OPS, find_sites, module_path, type_matches
from rewrite.spec import path_matches, target_matches
from rewrite.tags import tag_of

_SITE_TARGETS = {op.target for op in SITE_OPS.values()}


@dataclass
class Explanation:
    path: str
    site: str  # one line: op, shapes, dtype, module class
    group: list[str]
    adapted: bool
    method: str | None = None  # the method instance, with its hyperparameters
    formula: str | None = None  # the method module's docstring
    why: list[str] = field(default_factory=list)
    original: list[str] = field(default_factory=list)
    tensors: list[str] = field(default_factory=list)  # adapter tensors: name, shape, trainable
    inserted: list[str] = field(default_factory=list)
    merged: list[str] = field(default_factory=list)
    cost: list[str] = field(default_factory=list)
    mode: str = "eval"
    merged_delta: float | None = None  # max |merged weight - W|; 0 while the adapter is identity


def _arg_text(arg: Any) -> str:
    if isinstance(arg, torch.fx.Node):
        return arg.target if arg.op == "get_attr" else arg.name
    if isinstance(arg, list | tuple):
        inner = ", ".join(_arg_text(a) for a in arg)
        return f"[{inner}]"
    return repr(arg)


def node_line(node: torch.fx.Node) -> str:
    """`name = aten.op(args, k=v)  # [shape] dtype`: one node as a line of code."""
    args = [_arg_text(a) for a in node.args]
    args += [f"{k}={_arg_text(v)}" for k, v in node.kwargs.items()]
    value = value_text(node)
    return f"{node.name} = {short_target(node)}({', '.join(args)})" + (
        f"  # {value}" if value else ""
    )


def explain(adapted: Any, pattern: str, tokens: int = 1) -> list[Explanation]:
    """Explanations of every site whose path matches `pattern` (glob or dotted suffix)."""
    # slices ("*.qkv_proj[0:64]") and expert weights too, matched as a spec target would be
    matches = [s for s in adapted.sites.everything() if target_matches(s, pattern)]
    if not matches:
        example = next(iter(adapted.sites)).path if len(adapted.sites) else "(none)"
        raise ValueError(
            f"no site matches {pattern!r}; give a glob over module paths such as "
            f"'*.layers.0.self_attn.q_proj' or a suffix such as 'q_proj' (paths look like "
            f"{example!r})"
        )
    program = adapted.program(values=True)
    by_path = {a.site.path: a for a in adapted.plan}
    merged_gm, merge_error = None, None
    if any(s.path in by_path for s in matches):
        try:
            merged_gm = adapted.merge()
        except MergeError as e:  # one unmergeable method: say so per site below
            merge_error = str(e)
    base_nodes = find_sites(program).nodes
    return [
        _explain_site(
            adapted,
            program,
            site,
            by_path.get(site.path),
            base_nodes,
            merged_gm,
            merge_error,
            tokens,
        )
        for site in matches
    ]


def _explain_site(adapted, program, site, a, base_nodes, merged_gm, merge_error, tokens):
    mode = "train" if program.training else "eval"
    e = Explanation(
        path=site.path,
        site=(
            f"{site.op} {site.in_features} -> {site.out_features}, "
            f"{str(site.dtype).removeprefix('torch.')}, {site.module_class or 'module'} "
            f"(type {site.module_type}, layer {site.layer if site.layer is not None else '-'})"
        ),
        group=[p for p in site.group if p != site.path],
        adapted=a is not None,
        mode=mode,
    )
    e.original = [node_line(n) for n in base_nodes.get(site.path, [])]
    if a is None:
        e.why = _not_chosen(adapted, site)
        return e
    method = a.method
    e.method = repr(method)
    module = sys.modules.get(type(method).__module__)
    e.formula = (module.__doc__ or "").strip() if module else None
    e.why = _chosen(adapted, a)
    state = adapted.state()
    for name, spec in method.params(site).items():
        target = param_target(method, site, name)
        flags = "trainable" if spec.trainable else "frozen"
        flags += ", shared by every site of this method" if spec.shared else ""
        e.tensors.append(f"{target}  {list(state[target].shape)}  ({flags})")
    for node in program.graph.nodes:
        tag = tag_of(node)
        if not tag or site.path not in tag["sites"] or node.op == "placeholder":
            continue
        line = node_line(node)
        if tag.get("role", "adapter") != "adapter":
            line += f"  [{tag['role']}]"
        if tag.get("output"):
            users = ", ".join(u.name for u in node.users) or "nothing"
            line += f"\n    -> the adapted output: replaces {tag.get('base')} for {users}"
        e.inserted.append(line)
    e.merged, e.merged_delta = _merged_lines(a, state, merged_gm, merge_error)
    cost = method.cost(site)
    values = cost.evaluate(tokens)
    for name in ("params", "flops_forward", "flops_backward", "activation_bytes"):
        e.cost.append(f"{name} = {getattr(cost, name)} = {values[name]:,}")
    return e


def _chosen(adapted, a) -> list[str]:
    plan = adapted.plan
    why = []
    reason = plan.reasons.get(a.site.path)
    rules = adapted.spec.adapters
    rule = rules[a.rule] if isinstance(a.rule, int) and 0 <= a.rule < len(rules) else None
    why.append(f"placement: {plan.strategy}" + (f"; {reason}" if reason else ""))
    if rule is not None:
        why.append(f"the first rule that selects it: {rule.describe()}")
    score = plan.site_scores.get(a.site.path)
    if score is not None:
        why.append(f"NFN score of this site: {score:.4f}")
    type_score = plan.type_scores.get(a.site.module_type)
    if type_score is not None:
        why.append(f"mean NFN of type {a.site.module_type}: {type_score:.4f}")
    return why


def _not_chosen(adapted, site) -> list[str]:
    """Per spec rule, why it does not select this site."""
    why = ["no adapter: no rule of the spec placed one here"]
    for rule in adapted.spec.adapters:
        excluded = [p for p in rule.exclude if path_matches(site.path, p)]
        if excluded:
            miss = f"excluded by {excluded[0]!r}"
        elif rule.targets and not any(target_matches(site, t) for t in rule.targets):
            miss = "no target matches this path"
        elif rule.types and not any(type_matches(site.module_type, t) for t in rule.types):
            miss = f"type {site.module_type!r} is not among its types"
        elif rule.layers is not None and site.layer not in rule.layers:
            miss = f"layer {site.layer} is not among its layers"
        else:
            miss = "selects it, but the placement left it out"
        why.append(f"{rule.describe()}: {miss}")
    return why


def _merged_lines(a, state, merged_gm, merge_error) -> tuple[list[str], float | None]:
    site, method = a.site, a.method
    if merged_gm is None:
        try:  # is it this site that cannot merge, or another one?
            merged_weights([a], state)
        except MergeError as e:
            return [f"not mergeable: {e}"], None
        return [f"this site merges, but the model as a whole does not: {merge_error}"], None
    nodes = [
        n
        for n in merged_gm.graph.nodes
        if n.op == "call_function"
        and n.target in _SITE_TARGETS
        and module_path(n, "")[0] == site.owner
    ]
    left = [n for n in merged_gm.graph.nodes if site.path in (tag_of(n) or {}).get("sites", ())]
    lines = [node_line(n) for n in nodes]
    doc = (method.merged_weight.__doc__ or "").strip().splitlines()
    lines.append(f"the weight it reads is merged_weight(W, adapter): {doc[0] if doc else ''}")
    w_index = SITE_OPS[site.op].weight if site.op in SITE_OPS else None  # experts: a weight
    delta = None
    if nodes and w_index is not None and isinstance(nodes[0].args[w_index], torch.fx.Node):
        target = nodes[0].args[w_index].target
        merged_w = merged_gm.get_parameter(target)
        with torch.no_grad():
            delta = (
                (logical_weight(site, merged_w).float() - logical_weight(site, state[site.weight]))
                .abs()
                .max()
                .item()
            )
        lines.append(
            f"max |merged - W| = {delta:.3g}"
            + ("  (the adapter is still the identity)" if delta == 0 else "")
        )
    lines.append(f"adapter nodes left for this site after merging: {len(left)}")
    return lines, delta


def format_explanation(e: Explanation) -> str:
    def section(title: str, lines: Sequence[str]) -> list[str]:
        if not lines:
            return []
        return [f"{title}:"] + ["  " + line.replace("\n", "\n  ") for line in lines]

    out = [f"site {e.path}", f"  {e.site}"]
    if e.group:
        out.append(f"  shares its input with: {', '.join(e.group)}")
    if not e.adapted:
        out += section("why not adapted", e.why)
        out += section("original node", e.original)
        return "\n".join(out)
    out.append(f"method: {e.method}")
    out += section("formula (from the method's docstring)", (e.formula or "").splitlines())
    out += section("why this site", e.why)
    out += section(f"original node ({e.mode} graph)", e.original)
    out += section("adapter tensors", e.tensors)
    out += section(f"inserted subgraph ({e.mode} graph, {len(e.inserted)} nodes)", e.inserted)
    out += section("merged form (eval graph, adapters folded)", e.merged)
    out += section("cost (sympy; T = tokens per step)", e.cost)
    return "\n".join(out)
