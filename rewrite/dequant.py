"""The graph's dequantize ops, and the saved-tensor hooks that keep backward memory low.

`peftc::dequantize_nf4` and `peftc::dequantize_int8` are custom ops (torch.library): one node
per quantized weight, placed right before its matmul, traceable by torch.compile fullgraph
(fake implementations registered) and by FX. Their inputs are buffers, so they have no
gradient.

Why a custom op rather than the codec's ATen ops inlined: eager autograd saves a matmul's
weight operand for the backward (grad of x = grad @ W), so every layer's dequantized weight
would stay alive until its backward, and the peak would hold the whole base in full
precision. Each dequantized output is remembered here (weakly), and inside
`recompute_dequantized()` autograd saves, for such a tensor (or a view of it, as linear's
`W.t()`), only how to rebuild it from the codes: the backward dequantizes again, as
bitsandbytes does.

A compiled step needs the opposite: an opaque op is one more kernel that Inductor cannot fuse
or recompute. `inline_dequantize` gives the compile lowering a copy of the graph whose
dequantize nodes call the codec's plain torch code instead, so Dynamo traces them as ATen ops:
Inductor fuses each weight's unpack, lookup and scale into one generated kernel, and the
partitioner recomputes that kernel in the backward from the codes (graph inputs) rather than
saving the dequantized weight. The eager graph keeps the custom ops and their recipes.
"""

from __future__ import annotations

import contextlib
import copy
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import torch

from rewrite.codec import dequantize_int8, dequantize_nf4

# id(dequantized tensor) -> (weak reference to it, how to make it again)
_MADE: dict[int, tuple[weakref.ref, Callable[[], torch.Tensor]]] = {}


def _remember(out: torch.Tensor, make: Callable[[], torch.Tensor]) -> torch.Tensor:
    # views (linear's W.t(), a reshape) all name the root tensor as their _base
    root = out if out._base is None else out._base
    key = id(root)
    _MADE[key] = (weakref.ref(root, lambda _: _MADE.pop(key, None)), make)
    return out


def _nf4_tensors(codes, code, absmax, code2, absmax2, offset) -> dict[str, torch.Tensor]:
    tensors = {"codes": codes, "code": code, "absmax": absmax}
    if absmax2 is not None:
        tensors.update(code2=code2, absmax2=absmax2, offset=offset)
    return tensors


@torch.library.custom_op("peftc::dequantize_nf4", mutates_args=())
def dequantize_nf4_op(
    codes: torch.Tensor,
    code: torch.Tensor,
    absmax: torch.Tensor,
    code2: torch.Tensor | None,
    absmax2: torch.Tensor | None,
    offset: torch.Tensor | None,
    blocksize: int,
    shape: list[int],
    dtype: torch.dtype,
) -> torch.Tensor:
    """An NF4 weight in `dtype` (double-quantized when absmax2 is given)."""
    tensors = _nf4_tensors(codes, code, absmax, code2, absmax2, offset)

    def make() -> torch.Tensor:
        return dequantize_nf4(tensors, tuple(shape), blocksize, dtype)

    return _remember(make(), make)


@dequantize_nf4_op.register_fake
def _(codes, code, absmax, code2, absmax2, offset, blocksize, shape, dtype):
    return codes.new_empty(shape, dtype=dtype)


@torch.library.custom_op("peftc::dequantize_int8", mutates_args=())
def dequantize_int8_op(
    codes: torch.Tensor, absmax: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """A per-channel int8 weight in `dtype`."""

    def make() -> torch.Tensor:
        return dequantize_int8({"codes": codes, "absmax": absmax}, dtype)

    return _remember(make(), make)


@dequantize_int8_op.register_fake
def _(codes, absmax, dtype):
    return codes.new_empty(codes.shape, dtype=dtype)


class _Rebuild:
    """What autograd keeps instead of a dequantized weight: how to make it, and the view."""

    def __init__(self, make: Callable[[], torch.Tensor], view: torch.Tensor | None):
        self.make = make
        self.view = None if view is None else (view.size(), view.stride(), view.storage_offset())

    def __call__(self) -> torch.Tensor:
        out = self.make()
        return out if self.view is None else out.as_strided(*self.view)


def _pack(t: torch.Tensor):
    for candidate, view in ((t, t), (t._base, t)):
        if candidate is None:
            continue
        entry = _MADE.get(id(candidate))
        if entry is not None and entry[0]() is candidate:
            return _Rebuild(entry[1], view)
    return t


def _unpack(saved):
    return saved() if isinstance(saved, _Rebuild) else saved


@contextlib.contextmanager
def recompute_dequantized() -> Iterator[None]:
    """Within the block, autograd saves dequantized weights as recipes, not as tensors."""
    with torch.autograd.graph.saved_tensors_hooks(_pack, _unpack):
        yield


def _nf4_inline(codes, code, absmax, code2, absmax2, offset, blocksize, shape, dtype):
    tensors = _nf4_tensors(codes, code, absmax, code2, absmax2, offset)
    return dequantize_nf4(tensors, tuple(shape), blocksize, dtype)


def _int8_inline(codes, absmax, dtype):
    return dequantize_int8({"codes": codes, "absmax": absmax}, dtype)


def _recomputed(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """`fn` as a checkpointed region. Under torch.compile this tags its ATen nodes "prefer
    recompute", which the min-cut partitioner honours: without the tag it bans recomputing a
    value that the backward must materialize anyway (the weight feeding grad_input's matmul,
    functorch partitioners `ban_if_materialized_backward`) and saves every such fp32 weight;
    with it, the backward dequantizes again from the codes, which are graph inputs."""

    def run(*args: Any) -> torch.Tensor:
        return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False)

    return run


# each custom op -> the same computation as plain torch code, for a compiled graph
INLINE = {
    torch.ops.peftc.dequantize_nf4.default: _nf4_inline,
    torch.ops.peftc.dequantize_int8.default: _int8_inline,
}
RECOMPUTED = {op: _recomputed(fn) for op, fn in INLINE.items()}


def inline_dequantize(
    graph_module: torch.fx.GraphModule, recompute: bool = True
) -> torch.fx.GraphModule:
    """`graph_module` itself where it has no dequantize node, else a copy whose dequantize
    nodes call the codec's torch code (same arguments, same result bit for bit), for
    torch.compile to trace through. With `recompute` each is a checkpointed region, so the
    compiled backward dequantizes again instead of keeping the weight (pass False when the
    whole graph is checkpointed already)."""
    if not any(n.op == "call_function" and n.target in INLINE for n in graph_module.graph.nodes):
        return graph_module
    table = RECOMPUTED if recompute else INLINE
    graph = copy.deepcopy(graph_module.graph)
    for node in graph.nodes:
        if node.op == "call_function" and node.target in INLINE:
            node.target = table[node.target]
    return torch.fx.GraphModule(graph_module, graph)
