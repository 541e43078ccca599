"""Canonical linears: a matmul of an activation with a 2-D parameter is a linear.

`x @ self.weight.T` (a Linear subclass with a forward of its own), `torch.matmul(x, W.t())`,
`x.mm(W.transpose(0, 1))` and the like trace to `matmul` or `mm` of a transpose of the
parameter: `trace` rewrites each into `aten.linear(x, W)`. A product with the parameter as
stored (`x @ W`, W kept [in, out]) becomes `aten.linear(x, aten.t(W))`, a site whose weight
is stored transposed (`Site.transposed`), as GPT-2's Conv1D stores it for `addmm`. Either
way it is a linear site like any other: insertion, fusion, merge, NFN scores and the ONNX
export need nothing of their own.
"""

from __future__ import annotations

import torch
import torch.fx

from rewrite.program import PARAMETER, Program

aten = torch.ops.aten

MATMULS = (aten.matmul.default, aten.mm.default)


def _is_parameter(node: object, params: set[str]) -> bool:
    """A 2-D parameter placeholder."""
    return (
        isinstance(node, torch.fx.Node)
        and node.op == "placeholder"
        and node.name in params
        and node.meta.get("val") is not None
        and node.meta["val"].dim() == 2
    )


def _transposed_parameter(node: object, params: set[str]) -> torch.fx.Node | None:
    """The 2-D parameter placeholder that `node` transposes (its last two dims), or None."""
    if not isinstance(node, torch.fx.Node) or node.op != "call_function" or not node.args:
        return None
    source = node.args[0]
    if not _is_parameter(source, params):
        return None
    if node.target in (aten.t.default, aten.numpy_T.default, aten.mT.default):
        return source
    if node.target == aten.transpose.int and {d % 2 for d in node.args[1:3]} == {0, 1}:
        return source
    if node.target == aten.permute.default and [d % 2 for d in node.args[1]] == [1, 0]:
        return source
    return None


def canonicalize_linears(program: Program) -> int:
    """Rewrite matmul/mm(x, W.T) into linear(x, W) and matmul/mm(x, W) into
    linear(x, t(W)), in place; returns how many."""
    params = {s.name for s in program.slots if s.kind == PARAMETER}
    graph = program.graph
    rewritten = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in MATMULS or len(node.args) != 2:
            continue
        x, other = node.args
        if not isinstance(x, torch.fx.Node) or x.name in params:
            continue
        weight = _transposed_parameter(other, params)
        with graph.inserting_before(node):
            if weight is not None:  # x @ W.T: W is stored [out, in], as linear takes it
                linear = graph.call_function(aten.linear.default, (x, weight))
            elif _is_parameter(other, params):  # x @ W: W stored [in, out]
                t = graph.call_function(aten.t.default, (other,))
                t.meta = {**node.meta, "val": other.meta["val"].t()}
                linear = graph.call_function(aten.linear.default, (x, t))
            else:
                continue
        linear.meta = dict(node.meta)  # shape, module stack and source line: the same op
        node.replace_all_uses_with(linear)
        graph.erase_node(node)
        if weight is not None and not other.users:
            graph.erase_node(other)
        rewritten += 1
    if rewritten:
        program.recompile()
    return rewritten
