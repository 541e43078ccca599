"""Put a LoRA adapter inside its base GEMM (training graphs).

For y = x·Wᵀ + s·(x·Aᵀ)·Bᵀ the rank-r matmuls are skinny and run far below a GEMM's peak.
With Z = x·Aᵀ the forward is one GEMM over the concatenated reduction dimension,
y = [x | Z]·[W | s·B]ᵀ, and the backward gets [dx₀ | dZ] = dy·[W | s·B] from one GEMM too;
only dA = dZᵀ·x, dB = s·dyᵀ·Z and dx = dx₀ + dZ·A stay rank-r. No gradient of W is formed
(Unsloth's fast_lora backward algebra). The rule matches LoRA snippets without live dropout
on `aten.linear` sites; it runs on training graphs only, so merging and export (which use
the eval graph) see the ordinary form.
"""

from __future__ import annotations

import torch
import torch.fx

from rewrite.passes import RuleSet

aten = torch.ops.aten


class LoRAInGemm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, W, bias, A, B, scale):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        Z = x2 @ A.t()
        Wcat = torch.cat([W, B * scale], 1)
        y = torch.cat([x2, Z], 1) @ Wcat.t()
        if bias is not None:
            y = y + bias
        ctx.save_for_backward(x2, Z, W, A, B)
        ctx.scale = scale
        ctx.shape = shape
        return y.reshape(*shape[:-1], W.shape[0])

    @staticmethod
    def backward(ctx, dy):
        x2, Z, W, A, B = ctx.saved_tensors
        dy2 = dy.reshape(-1, dy.shape[-1])
        d = dy2 @ torch.cat([W, B * ctx.scale], 1)
        n_in = x2.shape[1]
        dx0, dZ = d[:, :n_in], d[:, n_in:]
        dx = (dx0 + dZ @ A).reshape(ctx.shape)
        dA = dZ.t() @ x2
        dB = (dy2.t() @ Z) * ctx.scale
        return dx, None, None, dA, dB, None


def lora_in_gemm(x, W, bias, A, B, scale):
    """linear(x, W, bias) + scale·linear(linear(x, A), B), as one GEMM each way."""
    return LoRAInGemm.apply(x, W, bias, A, B, scale)


class LoRAInGemmRule:
    """Pattern: add(linear(x, W[, b]), linear(linear(x, A), B), alpha=s) from a LoRA snippet.
    Rewrite: one `lora_in_gemm` call."""

    name = "lora_into_base_gemm"

    def matches(self, node: torch.fx.Node) -> bool:
        tag = node.meta.get("peftc", {})
        return (
            node.op == "call_function"
            and node.target == aten.add.Tensor
            and tag.get("output")
            and tag.get("method") in ("lora", "loraplus")
        )

    def check(self, node: torch.fx.Node) -> str | None:
        base, delta = node.args
        if not isinstance(base, torch.fx.Node) or base.target != aten.linear.default:
            return "base op is not aten.linear"
        if "alpha" not in node.kwargs:
            return "scale not folded into the add (run fold_scale first)"
        if not isinstance(delta, torch.fx.Node) or delta.target != aten.linear.default:
            return "adapter output is not a B matmul"
        inner = delta.args[0]
        if not isinstance(inner, torch.fx.Node) or inner.target != aten.linear.default:
            return "adapter input is not an A matmul"
        if inner.args[0] is not base.args[0]:
            return "A reads another input than the base op (live dropout)"
        if len(base.users) != 1 or len(delta.users) != 1 or len(inner.users) != 1:
            return "intermediate values have other users"
        return None

    def rewrite(self, node: torch.fx.Node) -> None:
        base, delta = node.args
        inner = delta.args[0]
        x, W = base.args[0], base.args[1]
        bias = base.args[2] if len(base.args) > 2 else None
        graph = node.graph
        with graph.inserting_before(node):
            fused = graph.call_function(
                lora_in_gemm, (x, W, bias, inner.args[1], delta.args[1], node.kwargs["alpha"])
            )
        fused.meta = {**node.meta, "peftc": {**node.meta["peftc"], "role": "fused"}}
        node.replace_all_uses_with(fused)
        for dead in (node, delta, inner, base):
            graph.erase_node(dead)


def lora_into_base_gemm() -> RuleSet:
    return RuleSet("lora_into_base_gemm", [LoRAInGemmRule()])
