"""Canonical linears: a matmul of an activation with a transposed 2-D parameter is a linear.

`x @ self.weight.T` (a Linear subclass with a forward of its own), `torch.matmul(x, W.t())`,
`x.mm(W.transpose(0, 1))` and the like trace to `matmul` or `mm` of a transpose of the
parameter. `trace` rewrites each into `aten.linear(x, W)`, so it is a linear site like any
other: insertion, fusion, merge, NFN scores and the ONNX export need nothing of their own.
A product with the parameter as stored (`x @ W`, W kept [in, out]) is not rewritten.
"""

from __future__ import annotations

import torch
import torch.fx

from rewrite.program import PARAMETER, Program

aten = torch.ops.aten

MATMULS = (aten.matmul.default, aten.mm.default)


def _transposed_parameter(node: object, params: set[str]) -> torch.fx.Node | None:
    """The 2-D parameter placeholder that `node` transposes (its last two dims), or None."""
    if not isinstance(node, torch.fx.Node) or node.op != "call_function" or not node.args:
        return None
    source = node.args[0]
    if not (isinstance(source, torch.fx.Node) and source.op == "placeholder"):
        return None
    val = source.meta.get("val")
    if source.name not in params or val is None or val.dim() != 2:
        return None
    if node.target in (aten.t.default, aten.numpy_T.default, aten.mT.default):
        return source
    if node.target == aten.transpose.int and {d % 2 for d in node.args[1:3]} == {0, 1}:
        return source
    if node.target == aten.permute.default and [d % 2 for d in node.args[1]] == [1, 0]:
        return source
    return None


def canonicalize_linears(program: Program) -> int:
    """Rewrite matmul/mm(x, transpose(W)) into linear(x, W) in place; returns how many."""
    params = {s.name for s in program.slots if s.kind == PARAMETER}
    graph = program.graph
    rewritten = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in MATMULS or len(node.args) != 2:
            continue
        x, transposed = node.args
        weight = _transposed_parameter(transposed, params)
        if weight is None or not isinstance(x, torch.fx.Node) or x.name in params:
            continue
        with graph.inserting_before(node):
            linear = graph.call_function(aten.linear.default, (x, weight))
        linear.meta = dict(node.meta)  # shape, module stack and source line: the same op
        node.replace_all_uses_with(linear)
        graph.erase_node(node)
        if not transposed.users:
            graph.erase_node(transposed)
        rewritten += 1
    if rewritten:
        program.recompile()
    return rewritten
