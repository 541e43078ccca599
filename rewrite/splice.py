"""Trace plain torch code into an ATen snippet and splice it into a program's graph.

Adapter forwards are written as ordinary torch code. `trace_snippet` exports such a function
with meta tensors shaped like the graph values it will read (symbolic dims stay dynamic), so
the spliced nodes are the same ATen training IR that the rest of the graph uses.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.fx
from torch.export import Dim


def example_like(val: torch.Tensor, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, dict]:
    """A meta tensor shaped like a graph value, and the dynamic-shape spec of its symbolic dims."""
    sizes, dynamic = [], {}
    for i, d in enumerate(val.shape):
        if isinstance(d, torch.SymInt):
            hint = d.node.hint
            sizes.append(int(hint) if hint is not None and int(hint) >= 2 else 3)
            dynamic[i] = Dim.AUTO
        else:
            sizes.append(int(d))
    return torch.empty(sizes, dtype=dtype or val.dtype, device="meta"), dynamic


class _Snippet(torch.nn.Module):
    def __init__(self, fn: Callable):
        super().__init__()
        self.fn = fn

    def forward(self, x, base_out, weight, bias, params):
        return self.fn(x, base_out, weight, bias, params)


def trace_snippet(
    fn: Callable,
    x: torch.fx.Node,
    base_out: torch.fx.Node,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    params: dict[str, torch.Tensor],
) -> torch.fx.GraphModule:
    """Export `fn(x, base_out, weight, bias, params)` into an ATen graph.

    `x` and `base_out` are graph nodes whose meta values give their (possibly symbolic) shapes;
    the other arguments are meta tensors of fixed shape.
    """
    x_ex, x_dyn = example_like(x.meta["val"])
    out_ex, out_dyn = example_like(base_out.meta["val"])
    args = (x_ex, out_ex, weight, bias, params)
    dynamic = (x_dyn or None, out_dyn or None, None, None, {k: None for k in params})
    ep = torch.export.export(_Snippet(fn), args, dynamic_shapes=dynamic, strict=False)
    return ep.graph_module


def splice(
    graph: torch.fx.Graph,
    snippet: torch.fx.GraphModule,
    inputs: list[torch.fx.Node | None],
    after: torch.fx.Node,
    meta: dict,
) -> tuple[torch.fx.Node, list[torch.fx.Node]]:
    """Copy `snippet`'s nodes into `graph` right after `after`, feeding its placeholders from
    `inputs` in order. Returns the node of its (single) output and the nodes inserted.

    The snippet was exported on meta tensors, so what it says about the meta device is
    dropped or moved to `after`'s device: its `_assert_tensor_metadata` checks (left by a
    real dtype cast, such as an fp32 upcast in a bf16 model) and `device=meta` arguments."""
    placeholders = [n for n in snippet.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(inputs):
        raise ValueError(f"snippet takes {len(placeholders)} inputs but {len(inputs)} were given")
    env: dict[torch.fx.Node, torch.fx.Node] = dict(zip(placeholders, inputs, strict=True))
    host = after.meta.get("val")
    device = host.device if isinstance(host, torch.Tensor) else None
    inserted = []
    output = None
    with graph.inserting_before(after.next):
        for node in snippet.graph.nodes:
            if node.op == "placeholder":
                continue
            if node.op == "output":
                output = torch.fx.map_arg(node.args[0], lambda n: env[n])
                continue
            if node.target is torch.ops.aten._assert_tensor_metadata.default:
                continue
            new = graph.node_copy(node, lambda n: env[n])
            if device is not None and new.kwargs.get("device") == torch.device("meta"):
                new.kwargs = {**new.kwargs, "device": device}
            new.meta = {**node.meta, "peftc": dict(meta)}
            env[node] = new
            inserted.append(new)
    if isinstance(output, tuple | list):
        (output,) = output
    return output, inserted
