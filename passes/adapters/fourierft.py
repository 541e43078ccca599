"""FourierFT: y = base(x) + x ΔWᵀ, ΔW = scaling · Re(IDFT2(S)), S sparse at fixed frequencies.

Gao et al., "Parameter-Efficient Fine-Tuning with Discrete Fourier Transform" (ICML 2024).
S [out, in] is zero except at n_frequency entries, drawn once by
`randperm(out·in, seed=random_loc_seed)[:n]` exactly as PEFT draws them (so PEFT checkpoints,
which hold only the coefficients, load unchanged); only those coefficients train. Like
PEFT, the coefficients start Gaussian (init_weights=False) or zero (init_weights=True, the
identity).
"""

from __future__ import annotations

from typing import ClassVar

import sympy
import torch
import torch.nn.functional as F

from passes.adapters.base import Params, ParamSpec, SiteContext, Tensor
from passes.adapters.contract import (
    FINITE_NON_ZERO,
    FLAG,
    NON_NEGATIVE_INT,
    POSITIVE_INT,
    Method,
    hp,
)
from passes.adapters.cost import D_IN, D_OUT, Cost, T
from passes.adapters.peft_record import PeftField, PeftFormat
from passes.adapters.registry import register
from rewrite.sites import Site

N_FREQUENCY = sympy.Symbol("n_frequency", positive=True, integer=True)


def _as_float32(t: torch.Tensor) -> torch.Tensor:
    # aten._to_copy, not .to(): the latter traces a device assertion on the meta tensors
    if t.dtype == torch.float32:
        return t
    return torch.ops.aten._to_copy.default(t, dtype=torch.float32)


def _cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t if t.dtype == dtype else torch.ops.aten._to_copy.default(t, dtype=dtype)


@register("fourierft")
class FourierFT(Method):
    n_frequency: int = hp(1000, POSITIVE_INT)
    scaling: float = hp(150.0, FINITE_NON_ZERO)
    random_loc_seed: int = hp(777, NON_NEGATIVE_INT)
    init_weights: bool = hp(False, FLAG)

    supported_ops: ClassVar[tuple[str, ...]] = ("linear", "addmm")
    peft = PeftFormat(
        peft_type="FOURIERFT",
        config="FourierFTConfig",
        fields={
            "n_frequency": PeftField("n_frequency", 1000, pattern="n_frequency_pattern"),
            "scaling": PeftField("scaling", 150.0),
            "random_loc_seed": PeftField("random_loc_seed", 777),
            "init_weights": PeftField("init_weights", False, read=bool),
        },
        keys={"fourierft_spectrum": "fourierft_spectrum"},
        fan_in_fan_out=True,
        pattern_lookup="suffix_or_path",
    )

    def check_site(self, site: Site) -> str | None:
        entries = site.in_features * site.out_features
        if self.n_frequency > entries:
            return (
                f"n_frequency {self.n_frequency} is more than the layer's in·out = "
                f"{site.in_features}·{site.out_features} = {entries} spectral entries; "
                f"lower n_frequency to at most {entries}"
            )
        return None

    def params(self, site: Site) -> dict[str, ParamSpec]:
        n = self.n_frequency
        return {
            "fourierft_spectrum": ParamSpec((n,)),
            # (row, column) of each coefficient in S; fixed by random_loc_seed, never saved
            "indices": ParamSpec((2, n), trainable=False, dtype=torch.int64),
        }

    def indices(self, site: Site) -> torch.Tensor:
        """PEFT's FourierFTLayer.update_layer draw of the frequency locations."""
        generator = torch.Generator().manual_seed(self.random_loc_seed)
        flat = torch.randperm(site.out_features * site.in_features, generator=generator)
        flat = flat[: self.n_frequency]
        return torch.stack([flat // site.in_features, flat % site.in_features], dim=0)

    def init(self, site: Site, W: Tensor, calib: object, generator: torch.Generator) -> Params:
        if self.init_weights:
            spectrum = torch.zeros(self.n_frequency)
        else:
            spectrum = torch.randn(self.n_frequency, generator=generator)
        return {"fourierft_spectrum": spectrum.to(W.dtype), "indices": self.indices(site)}

    def _delta(self, W: torch.Tensor, spectrum: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """scaling · Re(ifft2(S)) in fp32 (ifft2 has no half-precision kernels), [out, in]."""
        dense = torch.zeros_like(W, dtype=torch.float32)
        dense = torch.index_put(dense, (idx[0], idx[1]), _as_float32(spectrum))
        return torch.fft.ifft2(dense).real * self.scaling

    def forward(
        self, x: Tensor, base_out: Tensor, W: Tensor, p: Params, ctx: SiteContext
    ) -> Tensor:
        spectrum = p["fourierft_spectrum"]
        delta = _cast(self._delta(W, spectrum, p["indices"]), spectrum.dtype)
        return base_out + F.linear(_cast(x, delta.dtype), delta)

    def merged_weight(self, site: Site, W: Tensor, p: Params) -> Tensor:
        idx = p["indices"].long()  # the merge pass hands every tensor over as float
        return W + self._delta(W, p["fourierft_spectrum"], idx).to(W.dtype)

    def cost(self, site: Site) -> Cost:
        entries = D_IN * D_OUT
        # the dense ΔW is rebuilt each step: an inverse 2-D FFT (~5·N·log2 N real flops)
        ifft = 5 * entries * sympy.log(entries, 2)
        flops_forward = ifft + 2 * T * entries + T * D_OUT
        return Cost(
            params=N_FREQUENCY,
            flops_forward=flops_forward,
            flops_backward=2 * flops_forward,
            activation_bytes=entries * 4,  # ΔW in fp32, kept for the backward
            symbols={
                D_IN: site.in_features,
                D_OUT: site.out_features,
                N_FREQUENCY: self.n_frequency,
            },
        )
