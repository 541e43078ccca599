"""ONNX translations for complex-valued ATen ops that torchlib lacks.

torch.onnx carries a complex tensor of shape S as a real one of shape S + [2] (real and
imaginary parts last), and torchlib translates many ops on such tensors (`view_as_complex`,
`polar`, complex `mul`, `view_as_real`, ...). Llama 4's RoPE (`torch.polar` angles, then
`view_as_complex(q) * freqs_cis[:, :, None, :]`) also unsqueezes a complex tensor, which
torchlib has no complex translation for, so the export failed there. peftc registers these in
the registry its exports use (lowering/onnx.py's `_torchlib_registry_once`).
"""

from __future__ import annotations

from typing import Any

import torch
from onnxscript import opset18 as op


def unsqueeze_complex(self: Any, dim: int) -> Any:
    """unsqueeze on [..., 2]: a negative dim counts from the end past the trailing pair."""
    return op.Unsqueeze(self, [dim - 1 if dim < 0 else dim])


COMPLEX_TRANSLATIONS = {torch.ops.aten.unsqueeze.default: unsqueeze_complex}


def register_complex_translations(registry: Any) -> Any:
    """Add peftc's complex translations to a torch.onnx `ONNXRegistry`; returns it."""
    for target, function in COMPLEX_TRANSLATIONS.items():
        registry.register_op(target, function, is_complex=True)
    return registry
