"""Rewrite transformers' RoPE frequencies into the form onnxscript's rotary fusion matches.

transformers 5 computes the rotary angles as `position_ids[..., None].float() * inv_freq`
(a Mul); onnxscript's cos/sin-cache fusion, which turns rotate-half arithmetic into
onnxruntime's `RotaryEmbedding` op, matches the older `inv_freq @ position_ids` form (a
MatMul then a Transpose). The two are equal: the MatMul has a reduction length of 1. This
rule rewrites the first into the second before the ORT fusions run.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import pattern


class RopeFreqsAsMatMul(pattern.RewriteRuleClassBase):
    """Mul(Cast(Unsqueeze(pos[S], [0, -1]), float), inv_freq[E]) -> the MatMul form, [B, S, E].

    The position ids are expanded to [B, S] (B from `batch_source`, the first model input):
    onnxruntime's RotaryEmbedding wants one row of position ids per example."""

    def __init__(self, batch_source: ir.Value) -> None:
        super().__init__()
        self._batch_source = batch_source

    def pattern(self, op, pos, axes, inv_freq):
        return op.Mul(op.Cast(op.Unsqueeze(pos, axes), to=ir.DataType.FLOAT), inv_freq)

    def check(self, context, pos, axes, inv_freq, **_) -> pattern.MatchResult:
        result = pattern.MatchResult()
        if pos.shape is None or len(pos.shape) != 1:
            return result.fail("position ids are not 1-D", pos)
        if axes.const_value is None or [int(a) for a in axes.const_value.numpy()] not in (
            [0, 2],
            [0, -1],
        ):
            return result.fail("position ids are not unsqueezed to [1, S, 1]", axes)
        if inv_freq.const_value is None or inv_freq.const_value.numpy().ndim != 1:
            return result.fail("inv_freq is not a 1-D constant", inv_freq)
        return result

    def rewrite(self, op, pos, axes, inv_freq, **_):
        freq = inv_freq.const_value.numpy().astype(np.float32).reshape(1, -1, 1)
        batch = op.Shape(self._batch_source, start=0, end=1)
        rows = op.Concat(batch, op.Shape(pos), axis=0)
        pos_2d = op.Expand(op.Unsqueeze(pos, op.Constant(value_ints=[0])), rows)  # [B, S]
        pos_3d = op.Cast(op.Unsqueeze(pos_2d, op.Constant(value_ints=[1])), to=ir.DataType.FLOAT)
        angles = op.MatMul(op.Constant(value=ir.tensor(freq)), pos_3d)  # [B, E, S]
        return op.Transpose(angles, perm=[0, 2, 1])


def rewrite_rope_freqs(model: ir.Model) -> int:
    """Apply the rule in place; returns how many RoPE frequency computations it rewrote."""
    inputs = [v for v in model.graph.inputs if v.shape is not None and len(v.shape) >= 1]
    if not inputs:
        return 0
    return RopeFreqsAsMatMul.rule(inputs[0]).apply_to_model(model)
