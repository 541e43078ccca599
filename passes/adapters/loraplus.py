"""LoRA+: LoRA with a larger learning rate for B than for A (η_B = ratio·η_A).

Hayou, Ghosh and Yu, "LoRA+: Efficient Low Rank Adaptation of Large Models" (ICML 2024).
The adapter itself is LoRA (same tensors, forward, merge, cost and checkpoint); LoRA+ is an
optimizer recipe, so this method only adds its two learning-rate hyperparameters, which
`peftc.create_loraplus_optimizer` reads (as PEFT's `peft.optimizers.create_loraplus_optimizer`
takes them as arguments). A LoRA+ checkpoint is a plain PEFT LoRA one: the ratio leaves no
trace in adapter_config.json, so such a checkpoint loads back as `lora`.
"""

from __future__ import annotations

from dataclasses import replace
from typing import ClassVar

from passes.adapters.contract import POSITIVE_FINITE, hp
from passes.adapters.lora import MODULE_OPS, LoRA
from passes.adapters.registry import register


@register("loraplus")
class LoRAPlus(LoRA):
    loraplus_lr_ratio: float = hp(16.0, POSITIVE_FINITE)  # η_B / η_A; the paper recommends 2^4
    # PEFT's default learning rate for embedding adapters
    loraplus_lr_embedding: float = hp(1e-6, POSITIVE_FINITE)

    supported_ops: ClassVar[tuple[str, ...]] = MODULE_OPS
    # PEFT stores LoRA+ as plain LoRA; `lora` claims those checkpoints.
    peft = replace(LoRA.peft, claims=False)
