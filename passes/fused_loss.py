"""Fused, chunked linear + cross-entropy for training graphs traced with `labels`.

transformers computes a causal LM's loss inside the traced graph (ForCausalLMLoss): the
output head's linear gives [tokens, vocab] logits, they are upcast to fp32, flattened, and
`cross_entropy(logits, shifted labels, ignore_index=-100)` reduces them (mean, or sum then a
division by num_items_in_batch). Autograd keeps those fp32 logits and forms their gradient, two
[tokens, vocab] tensors that dominate step memory at a realistic vocabulary.

The `fused_loss` pass replaces head linear → upcast → view → cross_entropy with one custom op,
`peftc::linear_cross_entropy(h, W, target, ...)`, which goes over the kept tokens (labels not
`ignore_index`; ignored positions get no logits at all) a chunk of rows at a time: logits =
h_c·Wᵀ upcast to fp32 (the GEMM in autocast's dtype under autocast, as the unfused linear's),
their logsumexp, the target logit, and at once the loss's gradient w.r.t. h_c (softmax −
one-hot, scaled) times W, and w.r.t. W where W trains. Its registered backward only scales
the saved dh (and dW) by the incoming gradient, as Liger's fused linear cross-entropy does.
At most one chunk of logits is alive at a time, and the GEMM count equals the unfused
graph's (forward logits, backward dh). It is a custom op, not ATen inlined in the graph:
its loop has a data-dependent trip count (kept tokens), which `torch.compile(fullgraph=True,
dynamic=True)` could not trace, while Inductor calls an opaque op as it is.

The logits are then never made, so the fused graph returns `logits=None` (Liger's
`skip_logits`); the eval graph is not rewritten and returns logits. The pass declines, with a
reason in its stats, when the head is adapted (its output is base + adapter; the graph is left
as it was), has a bias, the logits have other readers, or the loss is not a plain mean/sum
cross-entropy.
"""

from __future__ import annotations

import contextlib
import functools
import operator
import threading
from collections.abc import Callable, Iterable, Iterator

import torch
import torch.fx
import torch.nn.functional as F

from rewrite.passes import RuleSet
from rewrite.tags import tag_of

aten = torch.ops.aten
Tensor = torch.Tensor

SUM, MEAN = 2, 1  # ATen's reduction enum (0 is none)
# logits per chunk: 32 MiB of fp32. Smaller chunks cost time on CPU: each chunk's two GEMMs
# stream all of W, and a [rows, hidden] x [hidden, vocab] GEMM with few rows runs far below
# peak (measured at vocab 32000: 32 rows 3.0x, 256 rows 1.2x the 512-row time per token)
CHUNK_ELEMENTS = 2**23

# ops between the head's linear and the loss that only view or upcast the logits
_VIEWS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}
_CASTS = {aten.to.dtype, aten._to_copy.default, aten.to.dtype_layout}


def chunk_rows(vocab: int) -> int:
    """Tokens per chunk: CHUNK_ELEMENTS logits, at least 16 rows."""
    return max(16, CHUNK_ELEMENTS // vocab)


_STEP = threading.local()


@contextlib.contextmanager
def compiled_step() -> Iterator[None]:
    """Marks a compiled training step's call (lowering/inductor.py). In it the op runs each
    chunk's softmax passes over bf16 or fp16 logits (autocast's, or a low-precision model's)
    as Inductor kernels (`_chunk_passes`): eagerly the upcast and the downcast are whole
    passes of their own, and Inductor is there already, while an eager step may run where no
    C++ compiler is. fp32 logits keep the eager loop, which works in place in one buffer
    (compiled, it measured no faster and kept 32 to 60 MiB more at vocab 32000)."""
    before = getattr(_STEP, "compiled", False)
    _STEP.compiled = True
    try:
        yield
    finally:
        _STEP.compiled = before


def _chunk_passes(logits: Tensor, target: Tensor, scale: Tensor) -> tuple[Tensor, Tensor]:
    """The eager loop's passes over one chunk of low-precision logits, functional for Inductor
    to fuse: the rows' summed loss (fp32) and scale·(softmax − one-hot) in the logits' dtype."""
    x = logits.float()
    top = x.amax(1, keepdim=True)
    e = (x - top).exp()
    norm = e.sum(1, keepdim=True)
    loss = (top + norm.log() - x.gather(1, target[:, None])).sum()
    grad = (e * (scale / norm)).scatter_add(1, target[:, None], (-scale).expand(len(target), 1))
    return loss, grad.to(logits.dtype)


@functools.cache
def _compiled_passes() -> Callable[..., tuple[Tensor, Tensor]]:
    return torch.compile(_chunk_passes, backend="inductor", fullgraph=True, dynamic=True)


@torch.library.custom_op("peftc::linear_cross_entropy", mutates_args=())
def linear_cross_entropy(
    h: Tensor,
    weight: Tensor,
    target: Tensor,
    ignore_index: int,
    reduction: int,
    weight_grad: bool,
    chunk: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """cross_entropy(linear(h, weight).float().flatten(0, -2), target) without the full logits.

    Returns (loss, dloss/dh, dloss/dweight); the last is empty unless `weight_grad`."""
    h2 = h.reshape(-1, h.shape[-1])
    t = target.reshape(-1)
    if t.numel() != h2.shape[0]:
        raise ValueError(
            f"the labels hold {t.numel()} positions but the hidden states {h2.shape[0]}: "
            "pass labels of the same batch and sequence length as input_ids"
        )
    keep = (t != ignore_index).nonzero().squeeze(1)
    kept = keep.numel()
    scale = 1.0 / kept if reduction == MEAN and kept else 1.0
    dh = torch.zeros_like(h2)
    dw = torch.zeros_like(weight) if weight_grad else weight.new_empty(0)
    total = torch.zeros((), dtype=torch.float32, device=h.device)
    every = kept == t.numel()  # no ignored position: chunks are views, not gathers
    # bf16 or fp16 logits in a compiled step: their passes compiled (fp32 stays in place)
    compiled = getattr(_STEP, "compiled", False) and weight.dtype != torch.float32
    for start in range(0, kept, chunk):
        rows = slice(start, min(start + chunk, kept))
        idx = keep[rows]
        hc = h2[rows] if every else h2.index_select(0, idx)
        tc = t[rows] if every else t.index_select(0, idx)
        logits = F.linear(hc, weight)
        if compiled:
            scale_t = logits.new_full((), scale, dtype=torch.float32)
            loss, grad = _compiled_passes()(logits, tc, scale_t)
            total += loss
        else:
            logits = logits.float()
            picked = logits.gather(1, tc[:, None])
            # scale·(softmax − one-hot), in place over the logits (the chunk's one big
            # buffer), with one exp per logit (logsumexp and then the softmax take two: 28%
            # slower)
            top = logits.amax(1, keepdim=True)
            grad = logits.sub_(top).exp_()
            norm = grad.sum(1, keepdim=True)
            total += (top + norm.log() - picked).sum()
            grad = grad.mul_(scale / norm)
            grad.scatter_add_(1, tc[:, None], grad.new_full((len(tc), 1), -scale))
            grad = grad.to(h.dtype)
        if every:
            dh[rows] = grad @ weight
        else:
            dh.index_copy_(0, idx, grad @ weight)
        if weight_grad:
            dw.addmm_(grad.t(), hc)
    if reduction == MEAN:
        total = total / kept if kept else total.new_tensor(float("nan"))
    return total, dh.view_as(h), dw


@linear_cross_entropy.register_fake
def _fake(h, weight, target, ignore_index, reduction, weight_grad, chunk):
    dw = torch.empty_like(weight) if weight_grad else weight.new_empty(0)
    return h.new_empty((), dtype=torch.float32), torch.empty_like(h), dw


def _setup(ctx, inputs, output) -> None:
    weight_grad = inputs[5]
    if ctx.needs_input_grad[1] and not weight_grad:
        raise RuntimeError(
            "the output head's weight requires grad, but the fused loss was built for a frozen "
            "head; compile with fused_loss=False to train the head's base weight"
        )
    ctx.save_for_backward(output[1], output[2])


def _backward(ctx, g_loss, g_dh, g_dw):
    dh, dw = ctx.saved_tensors
    grad_h = dh * g_loss.to(dh.dtype) if ctx.needs_input_grad[0] else None
    grad_w = dw * g_loss.to(dw.dtype) if ctx.needs_input_grad[1] else None
    return grad_h, grad_w, None, None, None, None, None


linear_cross_entropy.register_autograd(_backward, setup_context=_setup)

_LIB = torch.library.Library("peftc", "FRAGMENT")


def _register_autocast(device: str, key: str) -> None:
    """Under autocast, h and W enter in autocast's dtype (whichever it is; torch.library's
    register_autocast fixes one) and the op runs with autocast off: its GEMMs are the
    unfused linear's, cast once, and its softmax stays fp32. The casts are ops in the traced
    graph, so a compiled step gets them too (the op itself cannot see autocast at run time)."""

    def kernel(_keyset, h, weight, target, *rest):
        dtype = torch.get_autocast_dtype(device)
        with torch.autocast(device, enabled=False):
            return linear_cross_entropy(_cast(h, dtype), _cast(weight, dtype), target, *rest)

    _LIB.impl("linear_cross_entropy", kernel, key, with_keyset=True)


def _cast(t: Tensor, dtype: torch.dtype) -> Tensor:
    return t.to(dtype) if t.is_floating_point() and t.dtype != torch.float64 else t


for _device, _key in (("cpu", "AutocastCPU"), ("cuda", "AutocastCUDA")):
    _register_autocast(_device, _key)


class FuseLinearCrossEntropy:
    """Pattern: cross_entropy_loss(view(upcast(linear(h, W_head))), target). Rewrite: one
    `peftc::linear_cross_entropy` node; the logits output becomes None."""

    name = "fuse_linear_cross_entropy"

    def __init__(self, head_nodes: Iterable[torch.fx.Node], weight_grad: bool):
        self.head_nodes = set(head_nodes)
        self.weight_grad = weight_grad
        self._chain: list[torch.fx.Node] = []

    def matches(self, node: torch.fx.Node) -> bool:
        return node.op == "call_function" and node.target == aten.cross_entropy_loss.default

    def check(self, node: torch.fx.Node) -> str | None:
        args = list(node.args) + [None, MEAN, -100, 0.0][len(node.args) - 2 :]
        weight, reduction, _, smoothing = args[2:6]
        weight = node.kwargs.get("weight", weight)
        reduction = node.kwargs.get("reduction", reduction)
        smoothing = node.kwargs.get("label_smoothing", smoothing)
        if weight is not None or smoothing != 0.0:
            return "class weights or label smoothing"
        if reduction not in (MEAN, SUM):
            return "reduction none"
        chain, value = [], node.args[0]
        while isinstance(value, torch.fx.Node) and value.target in _VIEWS | _CASTS:
            if tag_of(value):
                break
            chain.append(value)
            value = value.args[0]
        if not isinstance(value, torch.fx.Node) or value not in self.head_nodes:
            if isinstance(value, torch.fx.Node) and tag_of(value):
                return "the output head is adapted"
            return "the loss does not read the output head's linear"
        if value.target != aten.linear.default or len(value.args) != 2:
            return "the output head has a bias or is not a plain linear"
        logits = node.args[0].meta.get("val")
        if logits is None or logits.dim() != 2 or logits.dtype != torch.float32:
            return "the loss does not read fp32 logits flattened to [tokens, vocab]"
        chain.append(value)
        for n in chain:
            for user in n.users:
                if user is node or user in chain or user.op == "output":
                    continue
                return "the logits have other readers than the loss"
        self._chain = chain
        return None

    def rewrite(self, node: torch.fx.Node) -> None:
        chain, self._chain = self._chain, []
        linear = chain[-1]
        h, weight = linear.args
        reduction = node.kwargs.get("reduction", node.args[3] if len(node.args) > 3 else MEAN)
        ignore = node.kwargs.get("ignore_index", node.args[4] if len(node.args) > 4 else -100)
        vocab = linear.meta["val"].shape[-1]
        graph = node.graph
        op_args = (h, weight, node.args[1], ignore, reduction, self.weight_grad, chunk_rows(vocab))
        with graph.inserting_before(node):
            fused = graph.call_function(torch.ops.peftc.linear_cross_entropy.default, op_args)
            loss = graph.call_function(operator.getitem, (fused, 0))
        meta = {k: v for k, v in node.meta.items() if k != "val"}
        fused.meta.update(meta)
        loss.meta.update(node.meta)
        fake = h.meta["val"].fake_mode if h.meta.get("val") is not None else None
        if fake is not None:
            with fake, torch.no_grad():  # a parameter's value requires grad in the trace
                fused.meta["val"] = linear_cross_entropy(
                    h.meta["val"], weight.meta["val"], node.args[1].meta["val"], *op_args[3:]
                )
        node.replace_all_uses_with(loss)
        graph.erase_node(node)
        out = graph.output_node()
        out.args = torch.fx.node.map_arg(out.args, lambda n: None if n in chain else n)


def fused_loss(head_nodes: Iterable[torch.fx.Node], weight_grad: bool = False) -> RuleSet:
    """The `fused_loss` pass over a training graph; `head_nodes` are the output head site's
    nodes, `weight_grad` whether the head's weight trains (a peftc base is frozen)."""
    return RuleSet("fused_loss", [FuseLinearCrossEntropy(head_nodes, weight_grad)])
