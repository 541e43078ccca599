"""C3A: y = base(x) + C(w)·x / d_in, C(w) a block-circulant matrix applied by FFT.

Chen et al., "Parameter-Efficient Fine-Tuning via Circular Convolution" (ACL 2025).
The weight update is (d_out/b) × (d_in/b) circulant blocks of size b, each defined by one
length-b kernel: block (m, n) maps x_n to y_i = Σ_j w[m, n][(j − i) mod b]·x_n[j], a circular
convolution (with the kernel reversed), computed as fft(Σ_n ifft(x_n)·fft(w[m, n])) as in PEFT.
Parity target: PEFT C3AConfig (nn.Linear only); its default init is xavier-uniform, so the
adapter is the identity at init only with init_weights="zeros" (PEFT's init_weights=True).
"""

from __future__ import annotations

import math

import sympy
import torch
from torch.fft import fft, ifft

from passes.adapters.base import Params, ParamSpec, SiteContext, Tensor
from passes.adapters.contract import POSITIVE_INT, Method, hp, one_of
from passes.adapters.cost import D_IN, D_OUT, Cost, T, dtype_bytes
from passes.adapters.peft_record import PeftField, PeftFormat
from passes.adapters.registry import register
from rewrite.sites import Site

BLOCK = sympy.Symbol("b", positive=True, integer=True)
INITS = ("xavier_uniform", "kaiming_uniform", "gaussian", "zeros")
# PEFT's init_weights values <-> ours: True means zeros, False means xavier-uniform.
_FROM_PEFT = {True: "zeros", False: "xavier_uniform"}


def circulant(w: torch.Tensor) -> torch.Tensor:
    """The dense [m·b, n·b] matrix of kernels w [m, n, b] (PEFT's get_circulant_fast)."""
    _, n, b = w.shape
    eye = torch.eye(n * b, dtype=w.dtype, device=w.device).reshape(n * b, n, b)
    x = torch.einsum("...nb,mnb->...mb", ifft(eye), fft(w))
    return fft(x).real.flatten(start_dim=1).T


@register("c3a")
class C3A(Method):
    block_size: int = hp(256, POSITIVE_INT)
    init_weights: str = hp("xavier_uniform", one_of(*INITS))

    peft = PeftFormat(
        peft_type="C3A",
        config="C3AConfig",
        fields={
            "block_size": PeftField("block_size", 256, pattern="block_size_pattern", read=int),
            "init_weights": PeftField(
                "init_weights",
                "xavier_uniform",
                read=lambda v: _FROM_PEFT.get(v, v),
                write=lambda v: True if v == "zeros" else v,
            ),
        },
        keys={"c3a_kernel": "c3a_kernel"},
        pattern_lookup="suffix_or_path",
    )

    def check_site(self, site: Site) -> str | None:
        b = self.block_size
        for what, n in (("in_features", site.in_features), ("out_features", site.out_features)):
            if n % b:
                return (
                    f"block_size {b} does not divide {what} {n}; pick a common divisor of "
                    f"in_features {site.in_features} and out_features {site.out_features} "
                    f"(their gcd is {math.gcd(site.in_features, site.out_features)})"
                )
        return None

    def params(self, site: Site) -> dict[str, ParamSpec]:
        b = self.block_size
        return {"c3a_kernel": ParamSpec((site.out_features // b, site.in_features // b, b))}

    def init(self, site: Site, W: Tensor, calib: object, generator: torch.Generator) -> Params:
        # Drawn in fp32 as PEFT does; stored in the model's dtype (forward and merge upcast to
        # fp32 for the FFTs, so fp32 models match PEFT exactly).
        k = torch.zeros(self.params(site)["c3a_kernel"].shape, dtype=torch.float32)
        fan_in, fan_out = site.in_features, site.out_features
        if self.init_weights == "gaussian":
            k.normal_(generator=generator)
        elif self.init_weights == "xavier_uniform":
            a = math.sqrt(3.0) * math.sqrt(2.0 / float(fan_in + fan_out))
            k.uniform_(-a, a, generator=generator)
        elif self.init_weights == "kaiming_uniform":
            a = math.sqrt(1.0 / float(fan_in))
            k.uniform_(-a, a, generator=generator)
        return {"c3a_kernel": k.to(W.dtype)}

    def forward(
        self, x: Tensor, base_out: Tensor, W: Tensor, p: Params, ctx: SiteContext
    ) -> Tensor:
        # PEFT runs the FFTs in fp32, then casts the update to the layer's dtype.
        w, xf = p["c3a_kernel"].float(), x.float()
        _, n, b = w.shape
        y = fft(torch.einsum("...nb,mnb->...mb", ifft(xf.unflatten(-1, (n, b))), fft(w)))
        y = y.real.flatten(-2) / x.shape[-1]
        return base_out + y.to(base_out.dtype)

    def merged_weight(self, site: Site, W: Tensor, p: Params) -> Tensor:
        """W + C(w) / d_in in the site's [out, in] layout."""
        delta = circulant(p["c3a_kernel"].to(torch.float32)).to(W.dtype)
        return W + delta / W.shape[-1]

    def cost(self, site: Site) -> Cost:
        n_in, n_out = D_IN / BLOCK, D_OUT / BLOCK
        fft_flops = 5 * BLOCK * sympy.log(BLOCK, 2)  # one complex length-b FFT, ~5·b·log2 b
        # per token: n forward FFTs, m·n complex multiply-adds (8 flops), m inverse FFTs
        flops_forward = T * ((n_in + n_out) * fft_flops + 8 * n_out * n_in * BLOCK + D_OUT)
        return Cost(
            params=D_IN * D_OUT / BLOCK,
            flops_forward=flops_forward,
            flops_backward=2 * flops_forward,
            activation_bytes=T * D_IN * 2 * dtype_bytes(torch.float32),  # ifft(x), complex
            symbols={D_IN: site.in_features, D_OUT: site.out_features, BLOCK: self.block_size},
        )
