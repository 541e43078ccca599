"""One ONNX graph that serves many LoRA adapters over one copy of the base weights.

Each adapted linear layer gets the adapters stacked, A: [n, r, in] and B: [n, out, r] (B holds
the LoRA scaling, negated, see `stacked_lora`; adapters of lower rank are zero-padded to the
largest rank), and an extra input `adapter_ids: int64[batch]` picks one adapter per example:

    y = base(x) + bmm(bmm(x, A[ids]^T), B[ids]^T)      (a gather, then two batched matmuls)

as in FLoRA (Wen & Chaudhuri, 2024); Punica and S-LoRA serve the same mix with custom
kernels (SGMV / MBGMV), this does it with stock ONNX ops. Only LoRA-form methods (LoRA, LoRA+)
on linear layers batch this way; other methods and site kinds are refused with the site named.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch
import torch.fx

from lowering.onnx import (
    TOLERANCE,
    ExportReport,
    export_module,
    fresh_inputs,
    verify,
    verify_shapes,
)
from passes.adapters.registry import methods
from passes.pipeline import Pipeline, pipeline_of
from rewrite.names import logical_weight, param_target
from rewrite.program import USER_INPUT, Program, Slot
from rewrite.sites import find_sites, operand
from rewrite.trace import trace
from rewrite.unlift import unlift

aten = torch.ops.aten
IDS = "adapter_ids"
BATCHED_OPS = ("linear", "addmm")


class MultiAdapterError(ValueError):
    """The adapters cannot share one graph; the message names the adapter, method and site."""


def _base_model(adapted: Any) -> torch.nn.Module:
    """The model an adapter is compiled on: a Pipeline's `model`, an AdaptedModel's `base`."""
    return adapted.model if isinstance(adapted, Pipeline) else adapted.base


def checked_pipelines(adapters: Sequence) -> list[Pipeline]:
    """The adapters' pipelines, checked first (on their public `base`/`model` and `plan`):
    one base model object, batchable methods on linear layers only."""
    if not adapters:
        raise MultiAdapterError("give at least one adapter for a multi-adapter export")
    base = _base_model(adapters[0])
    for i, adapted in enumerate(adapters):
        if _base_model(adapted) is not base:
            raise MultiAdapterError(
                f"adapter {i} is compiled on a different base model object; compile (or "
                "from_peft) every adapter on the same base model instance"
            )
        for a in adapted.plan.assignments:
            # a batchable method's forward is base + s·B(A(x)) over the unchanged base weight
            if not a.method.batchable:
                batchable = ", ".join(n for n, c in methods().items() if c.batchable)
                raise MultiAdapterError(
                    f"adapter {i} uses {a.method.name!r} at {a.site.path}: its forward does not "
                    f"batch across adapters (supported: {batchable}). Export that adapter "
                    "merged on its own instead"
                )
            if a.site.op not in BATCHED_OPS:
                raise MultiAdapterError(
                    f"adapter {i} puts {a.method.name} on the {a.site.op} site {a.site.path}; the "
                    "multi-adapter graph batches linear layers only. Leave that module out "
                    "of the adapter's targets, or export the adapter merged on its own"
                )
    return [pipeline_of(a) for a in adapters]


def stacked_lora(adapters: Sequence) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """whole site path -> (A [n, r_max, in], -s·B [n, out, r_max]) in fp32; zeros where an
    adapter skips a site, so that example rows pass through the base layer unchanged.

    B is stored negated and the update subtracted (y = base - bmm(h, -sB)): an `Add` after a
    projection is what onnxscript's MHA-bias fusion takes for a bias, and it would swallow the
    [batch, seq, out] update as one (onnxruntime then refuses to run). The negation is exact.
    Slices of a packed projection are one LoRA on the whole weight: their A matrices stacked
    along the rank and each B placed at its slice's rows, zero elsewhere."""
    by_site: dict[str, dict[int, list[tuple[torch.Tensor, torch.Tensor]]]] = {}
    whole: dict[str, Any] = {}
    for i, pipeline in enumerate(pipeline_of(a) for a in adapters):
        state = pipeline.state()
        for a in pipeline.plan.assignments:
            site = a.site
            A = state[param_target(a.method, site, "lora_A")].detach().float()
            B = -state[param_target(a.method, site, "lora_B")].detach().float() * a.method.scaling
            whole[site.owner] = pipeline.sites[site.owner]
            if site.rows is not None:
                rows = torch.zeros(whole[site.owner].out_features, B.shape[1])
                rows[site.rows[0] : site.rows[1]] = B
                B = rows
            by_site.setdefault(site.owner, {}).setdefault(i, []).append((A, B))
    out = {}
    n = len(adapters)
    for path, per_adapter in by_site.items():
        site = whole[path]
        joined = {
            i: (torch.cat([A for A, _ in pairs]), torch.cat([B for _, B in pairs], dim=1))
            for i, pairs in per_adapter.items()
        }
        rank = max(A.shape[0] for A, _ in joined.values())
        A_stack = torch.zeros(n, rank, site.in_features)
        B_stack = torch.zeros(n, site.out_features, rank)
        for i, (A, B) in joined.items():
            A_stack[i, : A.shape[0]] = A
            B_stack[i, :, : B.shape[1]] = B
        out[path] = (A_stack, B_stack)
    return out


def _add_ids_input(program: Program) -> torch.fx.Node:
    last = [n for n in program.graph.nodes if n.op == "placeholder"][-1]
    with program.graph.inserting_after(last):
        node = program.graph.placeholder(IDS)
    program.slots.append(Slot(USER_INPUT, node.name, IDS))
    program.input_names.append(IDS)
    return node


def _unflattened(x: torch.fx.Node, features: int) -> torch.fx.Node | None:
    """x itself when it is [batch, seq, features]; the 3-D tensor a [rows, features] x was
    flattened from, when the graph has it (a reshape of a reshape trips ORT's fusions); else
    None."""
    if x.meta["val"].dim() == 3:
        return x
    if x.op == "call_function" and x.target in (aten.view.default, aten.reshape.default):
        src = x.args[0]
        val = src.meta.get("val") if isinstance(src, torch.fx.Node) else None
        if val is not None and val.dim() == 3 and int(val.shape[-1]) == features:
            return src
    return None


def _without_bias(graph: torch.fx.Graph, node, site) -> tuple[torch.fx.Node, object]:
    """The base op `node` recomputed without its bias, and the bias (None when it has none)."""
    if site.op == "addmm":
        bias, x, w = node.args[:3]
        return graph.call_function(aten.mm.default, (x, w)), bias
    x, w, bias = (list(node.args) + [None, None])[:3]
    if bias is None:
        return node, None
    return graph.call_function(aten.linear.default, (x, w)), bias


def _splice_site(graph: torch.fx.Graph, node, site, ids, A, B) -> None:
    """Replace the base op `node` by xWᵀ - bmm(bmm(x, A[ids]ᵀ), B[ids]ᵀ) + bias.

    The bias comes last so that onnxruntime's fusions still take it into the op that
    follows (attention, BiasGelu, SkipLayerNormalization) as they do in the merged graph;
    added before the update, it stays a separate Add per site."""
    x = operand(node, site.op, "x")
    rank = x.meta["val"].dim()
    if rank not in (2, 3):
        raise MultiAdapterError(
            f"{site.path}: the multi-adapter graph needs [batch, seq, features] or "
            f"[rows, features] inputs, got rank {rank}"
        )
    call = graph.call_function
    with graph.inserting_before(node.next):  # in order, right after the base op
        base, bias = _without_bias(graph, node, site)
        a_sel = call(aten.index_select.default, (A, 0, ids))
        b_sel = call(aten.index_select.default, (B, 0, ids))
        x3 = _unflattened(x, site.in_features)
        if x3 is None:  # GPT-2 Conv1D flattens [batch, seq] to rows; rows are batch-major
            batch = call(aten.sym_size.int, (ids, 0))
            x3 = call(aten.view.default, (x, [batch, -1, site.in_features]))
        h = call(aten.bmm.default, (x3, call(aten.transpose.int, (a_sel, 1, 2))))
        delta = call(aten.bmm.default, (h, call(aten.transpose.int, (b_sel, 1, 2))))
        if rank == 2:
            delta = call(aten.view.default, (delta, [-1, site.out_features]))
        out = call(aten.sub.Tensor, (base, delta))  # delta holds -s·B·A·x, see stacked_lora
        if bias is not None:
            out = call(aten.add.Tensor, (out, bias))
    if base is node:
        node.replace_all_uses_with(out, delete_user_cb=lambda user: user is not out)
    else:
        node.replace_all_uses_with(out)
        graph.erase_node(node)


def multi_adapter_module(adapters: Sequence) -> tuple[torch.fx.GraphModule, dict]:
    """The base graph with every adapter stacked in; returns it and example inputs (with ids).

    `adapters` are AdaptedModels (or their Pipelines) on one base model."""
    first = checked_pipelines(adapters)[0]
    example = first.example_inputs
    # a fresh base trace: the pipelines' own traces are (or become) their adapted graphs
    program = trace(first.model, example, training=False)
    sites = find_sites(program)
    ids = _add_ids_input(program)
    state = first.base_state()
    for path, (A_stack, B_stack) in stacked_lora(adapters).items():
        site = sites[path]
        dtype = logical_weight(site, state[site.weight]).dtype
        names = (f"multi_lora.{path}.lora_A", f"multi_lora.{path}.lora_B")
        A_node, B_node = (program.add_parameter(n) for n in names)
        state[names[0]], state[names[1]] = A_stack.to(dtype), B_stack.to(dtype)
        for node in sites.nodes[path]:
            _splice_site(program.graph, node, site, ids, A_node, B_node)
    program.graph.lint()
    gm = unlift(program, state)
    batch = next(iter(example.values())).shape[0]
    example = {**example, IDS: torch.arange(batch, dtype=torch.int64) % len(adapters)}
    return gm, example


def export_multi(
    adapters: Sequence,
    path: str | os.PathLike,
    opset: int | None = None,
    *,
    check: bool = True,
    ort_fusions: bool = True,
) -> ExportReport:
    """Export one graph serving `adapters` (AdaptedModels, or their Pipelines, on one base),
    verified on fresh shapes with random adapter ids against the PyTorch graph."""
    gm, example = multi_adapter_module(adapters)
    report = export_module(
        gm, example, path, opset=opset, ort_fusions=ort_fusions, fusion_tolerance=TOLERANCE["fp32"]
    )
    report.dtype = "fp32"
    report.tolerance = TOLERANCE["fp32"]
    if check:
        g = torch.Generator().manual_seed(7)
        inputs = fresh_inputs(example, verify_shapes(example))
        for made in inputs:
            made[IDS] = torch.randint(0, len(adapters), made[IDS].shape, generator=g)
        report.max_errors, report.provider = verify(
            path, gm, example, report.tolerance, inputs=inputs
        )
    return report
