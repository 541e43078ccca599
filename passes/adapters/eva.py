"""EVA: LoRA whose A is the top-r principal directions of the layer's inputs, B = 0.

Paischer et al., "One Initialization to Rule them All: Fine-tuning via Explained Variance
Adaptation" (2024). Follows PEFT's `get_eva_state_dict`: an incremental PCA (randomized SVD,
seed 42) is fed one calibration batch at a time, cycling over the batches, until every one of
the r components has cosine similarity >= tau with its value one batch earlier; A = those
components (divided by √singular value with `whiten`). The update B·A starts at 0, so the
adapter is the identity at init, and it trains and merges like LoRA.

Ranks are uniform here (PEFT's rho = 1). Redistributing ranks across layers by explained
variance (rho > 1) is a placement decision: cost_model's `eva` placement strategy.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from passes.adapters.contract import FLAG, UNIT_INTERVAL, Rule, hp
from passes.adapters.eva_pca import eva_components
from passes.adapters.lora import LORA_FIELDS, LORA_KEYS, NOT_DORA, LoRA, LoRAUpdate
from passes.adapters.peft_record import PeftField, PeftFormat
from passes.adapters.registry import register
from rewrite.sites import Site

UNIFORM = Rule(
    "1.0 (uniform ranks); to redistribute ranks across layers, use the spec's placement: "
    "{strategy: eva, rho: ...}",
    lambda v: v == 1.0,
)


@register("eva")
class EVA(LoRAUpdate):
    tau: float = hp(0.99, UNIT_INTERVAL)
    whiten: bool = hp(False, FLAG)
    rho: float = hp(1.0, UNIFORM)

    supported_ops: ClassVar[tuple[str, ...]] = ("linear", "addmm")
    needs_calibration: ClassVar[bool] = True
    # rho is not read: it shaped the ranks at init, and the checkpoint's rank_pattern already
    # holds the ranks it chose. peftc's calibration drops padded tokens (attention mask); it
    # has no labels.
    peft = PeftFormat(
        peft_type="LORA",
        config="EvaConfig",
        when={**NOT_DORA, "init_lora_weights": ("eva",)},
        fields={
            **LORA_FIELDS,
            "tau": PeftField("eva_config.tau", 0.99, read=float),
            "whiten": PeftField("eva_config.whiten", False, read=bool),
        },
        keys=LORA_KEYS,
        constants={
            **LoRA.peft.constants,
            "init_lora_weights": "eva",
            "eva_config.rho": 1.0,
            "eva_config.use_label_mask": False,
            "eva_config.label_mask_value": -100,
            "eva_config.adjust_scaling_factors": True,
        },
        fan_in_fan_out=True,
    )

    def init(
        self,
        site: Site,
        W: torch.Tensor,
        calib: list[torch.Tensor] | None,
        generator: torch.Generator,
    ) -> dict[str, torch.Tensor]:
        shapes = self.params(site)
        B = torch.zeros(shapes["lora_B"].shape, dtype=W.dtype)
        if calib is None:
            # Only when a checkpoint is loaded right after (peftc.from_peft): it holds A and B.
            return {"lora_A": torch.zeros(shapes["lora_A"].shape, dtype=W.dtype), "lora_B": B}
        A = eva_components(calib, self.rank, self.tau, self.whiten, site.path)
        return {"lora_A": A.to(W.dtype), "lora_B": B}
