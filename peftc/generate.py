"""Generation with the adapters live: transformers' own loop, KV cache included.

The traced graph is one forward without a cache, so it cannot drive an incremental decode.
`generate` instead runs the base model's `GenerationMixin.generate` with a forward hook on
each adapted module that adds the adapter, computed by the same `Method.forward` the graph
was traced from, on the same adapter tensors. Nothing is merged: generation during training
sees the current adapter values. The hooks live only for the call. A quantized base has its
weights dequantized for the call (the base's full-precision size, held while generating).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from passes.adapters.base import site_forward
from passes.pipeline import Pipeline
from rewrite.names import param_target, stored_weight, whole_weight


@contextlib.contextmanager
def live_adapters(pipeline: Pipeline) -> Iterator[None]:
    """Within the block, each adapted module of the base model computes its adapter eagerly;
    an expert weight is the adapted one (its update is in weight space, as in training)."""
    state = pipeline.state()
    modules = dict(pipeline.model.named_modules())
    handles = []
    swapped = []
    try:
        for a in pipeline.plan:
            if a.site.experts is not None:
                owner, _, leaf = a.site.weight.rpartition(".")
                holder = modules[owner]
                swapped.append((holder, leaf, holder._parameters[leaf]))
                holder._parameters[leaf] = torch.nn.Parameter(
                    _adapted_weight(a, state), requires_grad=False
                )
                continue
            module = modules.get(a.site.owner)
            if not hasattr(module, "weight"):  # None too: a product with a bare parameter
                raise ValueError(
                    f"generate needs a module to hook at each adapted site, and {a.site.path} "
                    "is a bare parameter product (x @ W), not a module; generate from the "
                    "merged model instead (adapted.merge() weights), or adapt modules only"
                )
            params = {n: state[param_target(a.method, a.site, n)] for n in a.method.params(a.site)}
            handles.append(module.register_forward_hook(_hook(a, params, state)))
        yield
    finally:
        for handle in handles:
            handle.remove()
        for holder, leaf, weight in reversed(swapped):
            holder._parameters[leaf] = weight


def _adapted_weight(a: Any, state: dict[str, torch.Tensor]) -> torch.Tensor:
    """An expert site's weight with its adapter folded in, in the weight's storage layout."""
    site, method = a.site, a.method
    params = {n: state[param_target(method, site, n)].detach() for n in method.params(site)}
    with torch.no_grad():
        W = whole_weight(site, state[site.weight].detach())
        return stored_weight(site, method.merged_weight(site, W, params))


def _hook(a: Any, params: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> Any:
    site, method = a.site, a.method

    def add_adapter(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        W = whole_weight(site, state[site.weight])
        bias = getattr(module, "bias", None)
        if site.has_bias or not isinstance(bias, torch.Tensor) or site.op != "linear":
            bias = bias if site.has_bias else None
            return site_forward(method, site, args[0], output, W, bias, params, False)
        # a Linear subclass whose own forward adds its bias after the product
        # (`x @ W.T + b`): the traced site is the product alone, so the method (DoRA scales
        # its input) sees the output less the bias, as in the graph and in PEFT
        return site_forward(method, site, args[0], output - bias, W, None, params, False) + bias

    return add_adapter


def generate(pipeline: Pipeline, *args: Any, **kwargs: Any) -> Any:
    """The base model's `generate(*args, **kwargs)` with the adapters live (eval mode)."""
    model = pipeline.model
    if not callable(getattr(model, "generate", None)):
        raise TypeError(
            f"{type(model).__name__} has no generate(): it is not a transformers generation "
            "model (GenerationMixin)"
        )
    was_training = model.training
    model.eval()
    # a quantized base runs its layers eagerly here, so they get their weights dequantized
    # for the call (the packed codes stay the model's storage)
    dense = pipeline.dense_base() if pipeline.quantized_weights else contextlib.nullcontext()
    try:
        with dense, live_adapters(pipeline), torch.no_grad():
            return model.generate(*args, **kwargs)
    finally:
        model.train(was_training)
