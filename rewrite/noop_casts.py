"""Casts that change nothing at trace time are traced as new values, not as the tensor itself.

`logits.float()` on fp32 logits returns `logits` itself, so torch.export, which tracks values
by tensor object, records an `aten.to` node and then reads every later use of `logits`
(returning it, too) from that node. Under `torch.autocast` the cast is real: the head's
output is bf16 and the graph's `to` upcasts it, so the graph returned fp32 logits where the
eager model returns bf16 ones, and every other later reader of the tensor got the upcast
copy. While tracing, `NoOpCastsAsValues` makes such a cast act on an `aten.alias` of its
input, a new object, so only the cast's own result is read from the `to` node; after the
export, `drop_cast_aliases` removes those aliases again (a functional graph needs no view
to say that two values share storage).
"""

from __future__ import annotations

from typing import Any

import torch
from torch.overrides import TorchFunctionMode

_DTYPE_METHODS = {
    torch.Tensor.float: torch.float32,
    torch.Tensor.double: torch.float64,
    torch.Tensor.half: torch.float16,
    torch.Tensor.bfloat16: torch.bfloat16,
}


def _is_noop_cast(func: Any, args: tuple, kwargs: dict) -> bool:
    if not args or not isinstance(args[0], torch.Tensor):
        return False
    self = args[0]
    if func in _DTYPE_METHODS:
        return self.dtype == _DTYPE_METHODS[func] and not kwargs.get("memory_format")
    if func is torch.Tensor.type_as:
        return isinstance(args[1], torch.Tensor) and args[1].dtype == self.dtype
    if func is torch.Tensor.to:
        if kwargs.get("copy") or (len(args) > 3 and args[3] is True):
            return False
        rest = {k: v for k, v in kwargs.items() if k != "copy"}
        try:
            device, dtype, _, memory_format = torch._C._nn._parse_to(*args[1:3], **rest)
        except (TypeError, RuntimeError):  # a form `_parse_to` does not know: leave it alone
            return False
        return (
            (dtype is None or dtype == self.dtype)
            and (device is None or device == self.device)
            and memory_format in (None, torch.preserve_format)
        )
    return False


class NoOpCastsAsValues(TorchFunctionMode):
    """While active, a cast that would return its input returns a distinct tensor instead."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _is_noop_cast(func, args, kwargs):
            args = (torch.ops.aten.alias.default(args[0]), *args[1:])
        return func(*args, **kwargs)


_CASTS = (
    torch.ops.aten.to.dtype,
    torch.ops.aten.to.dtype_layout,
    torch.ops.aten.to.device,
    torch.ops.aten.to.other,
    torch.ops.aten.type_as.default,
)


def drop_cast_aliases(graph_module: torch.fx.GraphModule) -> None:
    """Remove the `aten.alias` nodes `NoOpCastsAsValues` put in front of casts: an alias read
    only by casts (and export's dtype checks on them) is replaced by its input."""
    graph = graph_module.graph
    for node in list(graph.nodes):
        if node.target is not torch.ops.aten.alias.default:
            continue
        readers = list(node.users)
        if readers and all(
            r.target in _CASTS or r.target is torch.ops.aten._assert_tensor_metadata.default
            for r in readers
        ):
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
    graph_module.recompile()
