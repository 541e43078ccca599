"""Edits of the fused KV-cache decoder graph that onnxruntime-genai's model builder makes by
construction: packed QKV, and sequence lengths read from the attention mask.

After onnxscript's ORT fusions, each layer's attention is one `GroupQueryAttention` node, but
1. q, k and v are three MatMuls of the same hidden states. `pack_qkv` concatenates their
   weights (and biases) into one MatMul and gives GroupQueryAttention the packed tensor, as
   the builder writes it: one GEMM per layer instead of three.
2. its `seqlens_k` and `total_sequence_length` inputs, and its cos/sin caches, are computed
   from the past key's length, which ties the graph to a cache that grows by concatenation.
   `lengths_from_mask` computes the lengths from `attention_mask` as the builder does
   (`ReduceSum(mask) - 1`, and the mask's width); `constant_rope_cache` stores the cos/sin
   tables for the whole context as constants. Then no node but GroupQueryAttention reads the
   cache (`cache_read_by_attention_only`), and onnxruntime-genai can hand it one preallocated
   buffer for past and present (`past_present_share_buffer`) instead of a new, longer
   present tensor at every token.
Both are checked by the package's verification (onnxruntime-genai's tokens against
transformers'); each edit applies only where its pattern holds exactly, else the graph is
left as it is.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

GQA = "GroupQueryAttention"


def _attention_nodes(model: ir.Model) -> list[ir.Node]:
    return [n for n in model.graph if n.op_type == GQA and n.domain == "com.microsoft"]


def _constant(value: ir.Value | None) -> np.ndarray | None:
    if value is None or value.const_value is None:
        return None
    return value.const_value.numpy()


def _projection(value: ir.Value | None) -> tuple[ir.Value, np.ndarray, np.ndarray | None] | None:
    """(x, W [in, out], bias) when `value` is MatMul(x, W) or Add(MatMul(x, W), b), W and b
    constants used nowhere else; else None."""
    node = value.producer() if value is not None else None
    bias = None
    if node is not None and node.op_type == "Add" and len(value.uses()) == 1:
        b = _constant(node.inputs[1])
        if b is None or b.ndim != 1:
            return None
        bias, node = b, node.inputs[0].producer()
        if node is None or len(node.outputs[0].uses()) != 1:
            return None
    if node is None or node.op_type != "MatMul" or node.domain != "":
        return None
    W = _constant(node.inputs[1])
    if W is None or W.ndim != 2 or len(node.inputs[1].uses()) != 1:
        return None
    return node.inputs[0], W, bias


def pack_qkv(model: ir.Model) -> int:
    """Give each GroupQueryAttention whose q, k, v are projections of one x a single packed
    MatMul (+ bias); returns how many were packed."""
    graph = model.graph
    packed = 0
    for gqa in _attention_nodes(model):
        parts = [_projection(v) for v in gqa.inputs[:3]]
        if any(p is None for p in parts) or len({id(p[0]) for p in parts}) != 1:
            continue
        biases = [p[2] for p in parts]
        if any(b is None for b in biases) and not all(b is None for b in biases):
            continue
        x = parts[0][0]
        weight = _initializer(
            graph, f"{gqa.name}.qkv_weight", np.concatenate([p[1] for p in parts], axis=1)
        )
        matmul = ir.node("MatMul", [x, weight])
        new = [matmul]
        qkv = matmul.outputs[0]
        if biases[0] is not None:
            bias = _initializer(graph, f"{gqa.name}.qkv_bias", np.concatenate(biases))
            add = ir.node("Add", [qkv, bias])
            new.append(add)
            qkv = add.outputs[0]
        graph.insert_before(gqa, new)
        gqa.replace_input_with(0, qkv)
        gqa.replace_input_with(1, None)
        gqa.replace_input_with(2, None)
        packed += 1
    return packed


def lengths_from_mask(model: ir.Model) -> bool:
    """Feed every GroupQueryAttention seqlens_k = ReduceSum(mask, 1) - 1 and
    total_sequence_length = the mask's width (int32), as the builder does; False when the
    graph has no GroupQueryAttention or no attention_mask input."""
    graph = model.graph
    nodes = _attention_nodes(model)
    mask = next((v for v in graph.inputs if v.name == "attention_mask"), None)
    if not nodes or mask is None:
        return False
    one = _initializer(graph, "genai.one", np.array([1], dtype=np.int64))
    total = ir.node("ReduceSum", [mask, one], {"keepdims": 0})
    seqlens = ir.node("Sub", [total.outputs[0], one])
    seqlens32 = ir.node("Cast", [seqlens.outputs[0]], {"to": ir.DataType.INT32})
    width = ir.node("Shape", [mask], {"start": 1, "end": 2})
    width_scalar = ir.node("Squeeze", [width.outputs[0]])
    width32 = ir.node("Cast", [width_scalar.outputs[0]], {"to": ir.DataType.INT32})
    graph.insert_before(nodes[0], [total, seqlens, seqlens32, width, width_scalar, width32])
    for gqa in nodes:
        gqa.replace_input_with(5, seqlens32.outputs[0])
        gqa.replace_input_with(6, width32.outputs[0])
    return True


def _rope_table(value: ir.Value | None, fn: str, context: int) -> np.ndarray | None:
    """The constant cos/sin table for `context` positions, when `value` is
    [Cast](fn(MatMul(positions, F))) with F a constant [1, half] row of frequencies."""
    node = value.producer() if value is not None else None
    cast = None
    if node is not None and node.op_type == "Cast":
        cast, node = node, node.inputs[0].producer()
    if node is None or node.op_type != fn:
        return None
    matmul = node.inputs[0].producer()
    if matmul is None or matmul.op_type != "MatMul":
        return None
    freqs = _constant(matmul.inputs[1])
    if freqs is None or freqs.ndim != 2 or freqs.shape[0] != 1:
        return None
    angles = np.arange(context, dtype=np.float32)[:, None] * freqs.astype(np.float32)
    table = np.cos(angles) if fn == "Cos" else np.sin(angles)
    if cast is not None:
        table = table.astype(ir.DataType(cast.attributes["to"].as_int()).numpy())
    return table


def constant_rope_cache(model: ir.Model, context: int) -> bool:
    """Replace GroupQueryAttention's cos/sin caches, computed per call up to the current
    length (read from the past key's shape), by constant tables of `context` rows, as the
    builder stores them. Only where both are plain cos/sin of positions x frequencies."""
    nodes = _attention_nodes(model)
    if not nodes:
        return False
    tables = [(_rope_table(n.inputs[7], "Cos", context), _rope_table(n.inputs[8], "Sin", context))
              for n in nodes if len(n.inputs) > 8]  # fmt: skip
    if len(tables) != len(nodes) or any(c is None or s is None for c, s in tables):
        return False
    graph = model.graph
    for i, (gqa, (cos, sin)) in enumerate(zip(nodes, tables)):
        gqa.replace_input_with(7, _initializer(graph, f"genai.cos_cache.{i}", cos))
        gqa.replace_input_with(8, _initializer(graph, f"genai.sin_cache.{i}", sin))
    return True


def cache_read_by_attention_only(model: ir.Model) -> bool:
    """True when GroupQueryAttention alone reads each past input and writes each present
    output: then onnxruntime-genai may share one buffer between them."""
    nodes = _attention_nodes(model)
    graph = model.graph
    past = [v for v in graph.inputs if v.name.startswith("past_key_values.")]
    written = {id(out) for gqa in nodes for out in gqa.outputs[1:3]}
    return (
        bool(past)
        and all(all(use.node.op_type == GQA for use in v.uses()) for v in past)
        and all(id(v) in written for v in graph.outputs if v.name.startswith("present."))
    )


def _initializer(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    if name in graph.initializers:
        return graph.initializers[name]
    value = ir.Value(name=name)
    value.const_value = ir.tensor(array)
    graph.register_initializer(value)
    return value


def builder_edits(model: ir.Model, context: int) -> dict[str, int]:
    """All three edits, then the nodes they left unused dropped (once); returns what each did
    and whether the cache may share one buffer (`shared_cache_buffer`)."""
    from onnx_ir.passes.common import RemoveUnusedNodesPass

    done = {
        "packed_qkv": pack_qkv(model),
        "lengths_from_mask": int(lengths_from_mask(model)),
        "constant_rope_cache": int(constant_rope_cache(model, context)),
    }
    RemoveUnusedNodesPass()(model)
    done["shared_cache_buffer"] = int(cache_read_by_attention_only(model))
    return done
