"""Bone (block affine): W' = W + ΔW, ΔW_ij = W_ij·B_i + B_i for every r×r block W_ij of W.

Kang, "Bone: Block Affine Transformation as Parameter Efficient Fine-tuning Methods for Large
Language Models" (2024; later renamed MiSS). W [out, in] is cut into (out/r)×(in/r) blocks of
size r×r; the blocks of block-row i share one trainable r×r matrix B_i, which acts on each
block as the affine map W_ij ↦ W_ij·B_i + B_i, so the update interacts with the weight.
B starts at zero, so the adapter starts as the identity.

PEFT 0.21.2 has no BoneConfig any more (PeftType.BONE is only a leftover name); Bone lives on
as MissConfig. Its block-affine maths is MiSS's `init_weights="bat"` mode ("Bat": Block
Affine Transformation, tensor miss_block of shape [out/r, r, r]); MiSS's default mode is the
later, weight-independent shard-sharing variant. Like PEFT's bat mode, r must divide both
in_features and out_features. Dropout does not apply: the update is to the weight itself.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from passes.adapters.base import Params, ParamSpec, SiteContext, Tensor
from passes.adapters.contract import POSITIVE_INT, Method, hp
from passes.adapters.cost import D_IN, D_OUT, Cost, R, T, dtype_bytes
from passes.adapters.peft_record import PeftField, PeftFormat
from passes.adapters.registry import register
from rewrite.sites import Site


def block_affine_delta(W: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """ΔW for W [out, in] and B [out/r, r, r], exactly as PEFT's MissLinear.get_delta_weight."""
    r = B.shape[-1]
    out_f, in_f = W.shape
    blocks = W.reshape(out_f // r, r, in_f // r, r).permute(2, 0, 1, 3)  # [in/r, out/r, r, r]
    return (blocks @ B + B).permute(1, 2, 0, 3).reshape(out_f, in_f)


@register("bone")
class Bone(Method):
    rank: int = hp(64, POSITIVE_INT, "the block size")  # PEFT's MissConfig.r

    # MissConfig's other forms (init_weights True, False, "mini") are the `miss` method's.
    peft = PeftFormat(
        peft_type="MISS",
        config="MissConfig",
        when={"init_weights": lambda v: v == "bat"},
        fields={"rank": PeftField("r", 64, read=int)},
        keys={"miss_block": "miss_block"},
        constants={"init_weights": "bat", "miss_dropout": 0.0, "mini_r": 1},
    )

    def check_site(self, site: Site) -> str | None:
        r = self.rank
        for what, n in (("in_features", site.in_features), ("out_features", site.out_features)):
            if n % r:
                return (
                    f"block size rank={r} does not divide {what} {n}; bone cuts the weight "
                    f"into r×r blocks, so pick r dividing both {site.in_features} and "
                    f"{site.out_features}"
                )
        return None

    def params(self, site: Site) -> dict[str, ParamSpec]:
        r = self.rank
        return {"miss_block": ParamSpec((site.out_features // r, r, r))}

    def init(self, site: Site, W: Tensor, calib: object, generator: torch.Generator) -> Params:
        return {"miss_block": torch.zeros(self.params(site)["miss_block"].shape, dtype=W.dtype)}

    def forward(
        self, x: Tensor, base_out: Tensor, W: Tensor, p: Params, ctx: SiteContext
    ) -> Tensor:
        # PEFT computes linear(x, W + ΔW) + bias; base_out + linear(x, ΔW) is the same sum.
        return base_out + F.linear(x, block_affine_delta(W, p["miss_block"]))

    def merged_weight(self, site: Site, W: Tensor, p: Params) -> Tensor:
        """W + ΔW in the site's [out, in] layout."""
        return W + block_affine_delta(W, p["miss_block"])

    def cost(self, site: Site) -> Cost:
        # ΔW costs (in/r)·(out/r) r×r matmuls per step; applying it is a dense d_in×d_out matmul.
        flops_forward = 2 * D_IN * D_OUT * R + 2 * T * D_IN * D_OUT
        return Cost(
            params=D_OUT * R,
            flops_forward=flops_forward,
            flops_backward=2 * flops_forward,
            activation_bytes=D_IN * D_OUT * dtype_bytes(site.dtype),  # ΔW is kept for backward
            symbols={D_IN: site.in_features, D_OUT: site.out_features, R: self.rank},
        )
