"""Mixture-of-experts grouped matmuls, in ops that torch.onnx exports and onnxruntime runs.

transformers 5 runs its experts (Mixtral, Qwen-MoE, ...) through one grouped matmul: the
tokens sorted by expert, `offs` the cumulative count per expert, each group multiplied by
its expert's weight (`transformers::grouped_mm_fallback` on CPU, `aten._grouped_mm` where
torch has a kernel). Neither has an ONNX translation, so the export replaces each with
`dense_grouped_mm`: every token's row against every expert's weight in one batched MatMul,
then a mask keeps the row of its own expert. Each output sums one product and zeros, so it
equals the grouped product; it does E times the matmul work, which is what a graph without
data-dependent loops pays (onnxruntime's fused MoE kernels take another layout).
"""

from __future__ import annotations

import copy

import torch
import torch.fx

from rewrite.sites import expert_matmuls


def dense_grouped_mm(
    rows: torch.Tensor, weight: torch.Tensor, offs: torch.Tensor, *_: object
) -> torch.Tensor:
    """rows [S, in] sorted by expert, weight [E, in, out], offs [E] cumulative row counts ->
    [S, out], row s multiplied by the weight of the expert whose range holds s."""
    ends = offs.to(torch.int64)
    starts = torch.cat([ends.new_zeros(1), ends[:-1]])
    index = torch.arange(rows.shape[0], device=rows.device).unsqueeze(1)  # [S, 1]
    own = (index >= starts) & (index < ends)  # [S, E]: the row's expert
    every = torch.matmul(rows.unsqueeze(0), weight)  # [E, S, out]
    return (every * own.t().unsqueeze(-1).to(every.dtype)).sum(0)


def decompose_grouped_mm(module: torch.nn.Module) -> torch.nn.Module:
    """`module` itself when it has no grouped matmul; else a GraphModule over the same
    parameters whose grouped matmuls call `dense_grouped_mm` (the caller's graph is left as
    it is, so it stays the reference the export is verified against)."""
    if not isinstance(module, torch.fx.GraphModule):
        return module
    grouped = expert_matmuls()
    if not any(n.op == "call_function" and n.target in grouped for n in module.graph.nodes):
        return module
    graph = copy.deepcopy(module.graph)
    for node in graph.nodes:
        if node.op == "call_function" and node.target in grouped:
            args = list(node.args) + [None] * 2
            if args[2] is None or args[3] is not None or node.kwargs.get("bias") is not None:
                raise ValueError(
                    f"{node.name}: a grouped matmul without offsets or with a bias has no ONNX "
                    "decomposition in peftc; build the model with "
                    "experts_implementation='batched_mm' (a transformers from_pretrained or "
                    "from_config argument), which exports as a gather and a batched matmul"
                )
            node.target = dense_grouped_mm
    return torch.fx.GraphModule(module, graph)
