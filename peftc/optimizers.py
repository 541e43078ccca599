"""LoRA+ optimizer: the parameter groups of PEFT's `peft.optimizers.create_loraplus_optimizer`.

Groups, in PEFT's order: A-like tensors at `lr`; LoRA embedding adapters at
`loraplus_lr_embedding`; B-like tensors (a name containing "lora_B", or any 1-D tensor) at
`lr·loraplus_lr_ratio`, with `loraplus_weight_decay` unless they are biases or LayerNorm
parameters, which get no decay. Names are tested as PEFT tests its own names, so the same
tensors land in the same groups.
"""

from __future__ import annotations

from typing import Any

import torch

from peftc.peft_format import key_suffixes
from rewrite.names import param_target


def _embedding_adapters(adapted) -> set[str]:
    """Names of the tensors PEFT keeps directly on a LoRA Embedding layer (lora_embedding_A/B)."""
    out = set()
    for a in adapted.plan:
        if a.site.op != "embedding":
            continue
        keys = key_suffixes(a.method, a.site)
        for name in a.method.params(a.site):
            if "." not in keys.get(name, "."):  # held by the layer itself, not a sub-module
                out.add(param_target(a.method, a.site, name))
    return out


def _no_decay_by_layer(model: torch.nn.Module) -> set[str]:
    """Parameters inside LayerNorm modules (transformers' ALL_LAYERNORM_LAYERS)."""
    out = set()
    for mod_name, module in model.named_modules():
        if isinstance(module, torch.nn.LayerNorm):
            out.update(f"{mod_name}.{n}" if mod_name else n for n, _ in module.named_parameters())
    return out


def _from_plan(adapted, field: str) -> Any:
    values = {getattr(a.method, field) for a in adapted.plan if hasattr(a.method, field)}
    if len(values) > 1:
        raise ValueError(
            f"the plan's loraplus rules use different {field} values {sorted(values)}; "
            f"pass {field}= explicitly"
        )
    return values.pop() if values else None


def create_loraplus_optimizer(
    adapted,
    optimizer_cls: type[torch.optim.Optimizer],
    lr: float,
    loraplus_lr_ratio: float | None = None,
    **kwargs: Any,
) -> torch.optim.Optimizer:
    """An optimizer over `adapted`'s trainable tensors with LoRA+ learning rates.

    `loraplus_lr_ratio` (and the `loraplus_lr_embedding` keyword) default to the values of the
    plan's `loraplus` rules. Other keywords (`loraplus_weight_decay`, `betas`, ...) are as in
    PEFT; what PEFT does not consume goes to `optimizer_cls`.
    """
    if loraplus_lr_ratio is None:
        loraplus_lr_ratio = _from_plan(adapted, "loraplus_lr_ratio")
        if loraplus_lr_ratio is None:
            raise ValueError(
                "loraplus_lr_ratio is required: pass it, or compile with method: loraplus"
            )
    if "loraplus_lr_embedding" not in kwargs:
        kwargs["loraplus_lr_embedding"] = _from_plan(adapted, "loraplus_lr_embedding") or 1e-6
    embedding = _embedding_adapters(adapted)
    no_decay = {f"base.{n}" for n in _no_decay_by_layer(adapted.base)}
    groups: dict[str, list[torch.nn.Parameter]] = {
        "A": [],
        "embedding": [],
        "B": [],
        "B_no_decay": [],
    }
    for name, param in adapted.named_parameters():
        if not param.requires_grad:
            continue
        if name in embedding:
            groups["embedding"].append(param)
        elif "lora_B" in name or param.ndim == 1:
            decays = name not in no_decay and "bias" not in name
            groups["B" if decays else "B_no_decay"].append(param)
        else:
            groups["A"].append(param)

    kwargs["lr"] = lr
    weight_decay = kwargs.pop("loraplus_weight_decay", 0.0)
    lr_embedding = kwargs.pop("loraplus_lr_embedding")
    param_groups = [
        {"params": groups["A"], "weight_decay": weight_decay, "lr": lr},
        {"params": groups["embedding"], "weight_decay": weight_decay, "lr": lr_embedding},
        {"params": groups["B"], "weight_decay": weight_decay, "lr": lr * loraplus_lr_ratio},
        {"params": groups["B_no_decay"], "weight_decay": 0.0, "lr": lr * loraplus_lr_ratio},
    ]
    return optimizer_cls(param_groups, **kwargs)
