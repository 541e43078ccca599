"""Give each fused attention's output the rank its readers were written for.

onnxscript's MHA fusion matches an attention that ends `Transpose -> Reshape(shape)` and
replaces both with onnxruntime's `MultiHeadAttention`, whose output is [B, S, H*Dh]. It does
not check the Reshape's shape (onnxscript 0.7's `mha.py`): GPT-2's attention ends in a Reshape
straight to [B*S, H*Dh], the 2-D input its Conv1D's Gemm reads, so the fused graph
hands that Gemm a 3-D tensor and onnxruntime refuses to load it. This edit, run after the
fusions, puts the flattening Reshape back where a fused attention's output was declared 2-D.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

FUSED_ATTENTION = ("MultiHeadAttention", "GroupQueryAttention", "Attention")


def restore_flat_attention_outputs(model: ir.Model) -> int:
    """Edit `model` in place; returns how many attention outputs it flattened again."""
    graph = model.graph
    restored = 0
    for node in list(graph):
        if node.op_type not in FUSED_ATTENTION or node.domain != "com.microsoft":
            continue
        out = node.outputs[0]
        if out.shape is None or len(out.shape) != 2 or not isinstance(out.shape[1], int):
            continue
        shape = ir.Value(name=f"{out.name}_flat_shape")
        shape.const_value = ir.tensor(np.array([-1, out.shape[1]], dtype=np.int64))
        graph.register_initializer(shape)
        reshape = ir.node("Reshape", [out, shape])
        flat = reshape.outputs[0]
        flat.name, flat.shape, flat.type = f"{out.name}_flat", out.shape, out.type
        for use in list(out.uses()):
            if use.node is not reshape:
                use.node.replace_input_with(use.idx, flat)
        for index, value in enumerate(graph.outputs):
            if value is out:
                graph.outputs[index] = flat
        out.shape = None  # [B, S, H*Dh], as the fused op writes it
        graph.insert_after(node, reshape)
        restored += 1
    return restored
