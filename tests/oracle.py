"""One linear (or conv) layer adapted by a method, for the oracle tests of the methods PEFT
lacks: the test writes the reference's forward from the formula in plain torch and compares it
with peftc's output on the same tensors (fp32, 1e-5)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

import peftc

TOL = 1e-5  # fp32


@dataclass
class OneLayer:
    layer: torch.nn.Module  # the base layer (its weight and bias are W and b)
    adapted: peftc.AdaptedModel
    x: torch.Tensor  # an input of other shapes than the trace's

    def tensors(self) -> dict[str, torch.Tensor]:
        """The adapter's tensors by name (trainable and frozen), detached."""
        return {
            k.rsplit(".", 1)[-1]: v.detach()
            for k, v in self.adapted.named_adapter_parameters().items()
        }

    def merged_weight(self) -> torch.Tensor:
        """The merge pass's weight for the layer, in the logical [out, in] layout (an addmm
        site, GPT-2's Conv1D, stores it [in, out])."""
        from passes.merge import merged_weights

        (a,) = self.adapted.plan.assignments
        merged = merged_weights([a], self.adapted.state())[a.site.path]
        return merged.T if a.site.stored_in_out else merged

    def out(self, x: torch.Tensor | None = None) -> torch.Tensor:
        with torch.no_grad():
            return self.adapted(self.x if x is None else x)

    def base_out(self, x: torch.Tensor | None = None) -> torch.Tensor:
        with torch.no_grad():
            return self.layer(self.x if x is None else x)


def one_linear(
    method: str, in_features: int = 24, out_features: int = 16, bias: bool = True, **hyper
) -> OneLayer:
    torch.manual_seed(0)
    layer = torch.nn.Linear(in_features, out_features, bias=bias)
    model = torch.nn.Sequential(layer)
    spec = {"adapters": [{"method": method, "targets": ["0"], **hyper}]}
    adapted = peftc.compile(model, spec, (torch.randn(2, 5, in_features),)).eval()
    return OneLayer(layer, adapted, torch.randn(3, 7, in_features, generator=_gen(1)))


def one_conv1d(method: str, **hyper) -> OneLayer:
    """GPT-2's Conv1D, 24 -> 16 (an addmm site: its weight is stored [in, out]); W = weight.T."""
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    layer = Conv1D(16, 24)
    torch.nn.init.normal_(layer.weight, std=0.2)
    torch.nn.init.normal_(layer.bias, std=0.1)
    spec = {"adapters": [{"method": method, "targets": ["0"], **hyper}]}
    adapted = peftc.compile(torch.nn.Sequential(layer), spec, (torch.randn(2, 5, 24),)).eval()
    return OneLayer(layer, adapted, torch.randn(3, 7, 24, generator=_gen(1)))


def one_conv2d(method: str, cin: int = 6, cout: int = 8, kernel: int = 3, **hyper) -> OneLayer:
    torch.manual_seed(0)
    layer = torch.nn.Conv2d(cin, cout, kernel, padding=1)
    model = torch.nn.Sequential(layer)
    spec = {"adapters": [{"method": method, "targets": ["0"], **hyper}]}
    adapted = peftc.compile(model, spec, (torch.randn(2, cin, 9, 9),)).eval()
    return OneLayer(
        layer, adapted, torch.randn(3, cin, 9, 9, generator=_gen(1))
    )  # batch is dynamic, not H, W


def perturbed(one: OneLayer, std: float = 0.1, seed: int = 2) -> OneLayer:
    """Trained-looking values on the trainable tensors, so the update shows."""
    g = _gen(seed)
    with torch.no_grad():
        for p in one.adapted.trainable_parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)
    return one


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)
