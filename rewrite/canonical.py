"""Canonical linears: a matmul of an activation with a 2-D parameter is a linear.

`x @ self.weight.T` (a Linear subclass with a forward of its own), `torch.matmul(x, W.t())`,
`x.mm(W.transpose(0, 1))`, `torch.bmm(x, W.t().unsqueeze(0).expand(b, -1, -1))`,
`torch.einsum("bsi,oi->bso", x, W)` and `torch.addmm(b, x, W.t())` trace to products with a
transpose of the parameter: `trace` rewrites each into `aten.linear(x, W[, b])`. A product with the parameter as
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


def _right_operand(
    node: object, params: set[str], batched: bool
) -> tuple[str, torch.fx.Node] | None:
    """What `x @ node` multiplies by, when node is a 2-D parameter W as stored ("in_out": the
    product is x @ W) or transposed ("out_in": x @ W.T); `batched` (bmm) first peels the
    `unsqueeze(0).expand(b, ...)` that repeats it over the batch."""
    if batched:
        if not (isinstance(node, torch.fx.Node) and node.target == aten.expand.default):
            return None
        node = node.args[0]
        if not (isinstance(node, torch.fx.Node) and node.target == aten.unsqueeze.default):
            return None
        if node.args[1] != 0:
            return None
        node = node.args[0]
    weight = _transposed_parameter(node, params)
    if weight is not None:
        return "out_in", weight
    if _is_parameter(node, params):
        return "in_out", node
    return None


def _einsum_operand(node: torch.fx.Node, params: set[str]) -> tuple[str, torch.fx.Node] | None:
    """`einsum("...i,oi->...o", x, W)` (or "...i,io->...o"): x times a 2-D parameter over x's
    last index, the parameter's other index last in the output."""
    equation, operands = node.args[0], node.args[1]
    if len(operands) != 2 or "->" not in equation or not _is_parameter(operands[1], params):
        return None
    lhs, out = equation.replace(" ", "").split("->")
    x_idx, w_idx = lhs.split(",")
    if len(w_idx) != 2 or not x_idx:
        return None
    inner = x_idx[-1]
    outer = w_idx.replace(inner, "", 1)
    if inner not in w_idx or len(outer) != 1 or outer in x_idx or out != x_idx[:-1] + outer:
        return None
    return ("out_in" if w_idx == outer + inner else "in_out"), operands[1]


def canonicalize_linears(program: Program) -> int:
    """Rewrite products of an activation with a 2-D parameter into `aten.linear`, in place:
    matmul/mm/bmm/einsum of x with W.T -> linear(x, W), with W as stored ([in, out]) ->
    linear(x, t(W)), and addmm(b, x, W.T) -> linear(x, W, b). Returns how many."""
    params = {s.name for s in program.slots if s.kind == PARAMETER}
    graph = program.graph
    rewritten = 0
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        bias = None
        if node.target in MATMULS and len(node.args) == 2:
            x, right = node.args[0], _right_operand(node.args[1], params, False)
        elif node.target == aten.bmm.default:
            x, right = node.args[0], _right_operand(node.args[1], params, True)
        elif node.target == aten.einsum.default:
            x, right = node.args[1][0], _einsum_operand(node, params)
        elif node.target == aten.addmm.default and len(node.args) == 3 and not node.kwargs:
            # addmm(b, x, W) with W stored [in, out] is a site already (GPT-2's Conv1D)
            bias, x, right = node.args[0], node.args[1], _right_operand(node.args[2], params, False)
            right = right if right is not None and right[0] == "out_in" else None
        else:
            continue
        if right is None or not isinstance(x, torch.fx.Node) or x.name in params:
            continue
        layout, weight = right
        with graph.inserting_before(node):
            if layout == "in_out":  # x @ W: W stored [in, out]
                t = graph.call_function(aten.t.default, (weight,))
                t.meta = {**node.meta, "val": weight.meta["val"].t()}
                weight = t
            args = (x, weight) if bias is None else (x, weight, bias)
            linear = graph.call_function(aten.linear.default, args)
        linear.meta = dict(node.meta)  # shape, module stack and source line: the same op
        dead = [a for a in node.all_input_nodes if a is not x and a is not bias]
        node.replace_all_uses_with(linear)
        graph.erase_node(node)
        _erase_unused(graph, dead, params)
        rewritten += 1
    if rewritten:
        program.recompile()
    return rewritten


def _erase_unused(graph: torch.fx.Graph, nodes: list[torch.fx.Node], params: set[str]) -> None:
    """Drop the transposes and expands that only fed a rewritten product (never a placeholder)."""
    while nodes:
        node = nodes.pop()
        if node.op == "call_function" and not node.users and node.name not in params:
            nodes.extend(node.all_input_nodes)
            graph.erase_node(node)
