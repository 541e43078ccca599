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
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterator

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
