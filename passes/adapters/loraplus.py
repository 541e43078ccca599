"""LoRA+: LoRA with a larger learning rate for B than for A (η_B = ratio·η_A).

Hayou, Ghosh and Yu, "LoRA+: Efficient Low Rank Adaptation of Large Models" (ICML 2024).
The adapter itself is LoRA (same tensors, forward, merge, cost and checkpoint); LoRA+ is an
optimizer recipe, so this method only adds its two learning-rate hyperparameters, which
`peftc.create_loraplus_optimizer` reads (as PEFT's `peft.optimizers.create_loraplus_optimizer`
takes them as arguments). A LoRA+ checkpoint is a plain PEFT LoRA one: the ratio leaves no
trace in adapter_config.json, so such a checkpoint loads back as `lora`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from passes.adapters.lora import LoRA
from passes.adapters.registry import register


@register("loraplus")
@dataclass(frozen=True)
class LoRAPlus(LoRA):
    loraplus_lr_ratio: float = 16.0  # η_B / η_A; the paper recommends 2^4
    loraplus_lr_embedding: float = 1e-6  # PEFT's default learning rate for embedding adapters

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("loraplus_lr_ratio", "loraplus_lr_embedding"):
            v = getattr(self, name)
            if (
                not isinstance(v, int | float)
                or isinstance(v, bool)
                or not math.isfinite(v)
                or v <= 0
            ):
                raise ValueError(f"loraplus: {name} must be a positive finite number, got {v!r}")

    @classmethod
    def claims_peft(cls, config: dict) -> bool:
        return False  # PEFT stores LoRA+ as plain LoRA; `lora` claims those checkpoints
