"""NLoRA / SLoRA against the reference formula, fp32, 1e-5: y = x·Wᵀ + b + s·x·(B·N·A)ᵀ with
the SLoRA init (A, N Kaiming-uniform, B zero) and the Nyström init (A = W[:r], B = W[:, :r],
N = W[:r, :r]⁺, the initial product taken out through frozen copies). The method-generic
checks (merge, gradients, checkpoints, bf16, ONNX, counts) run the default SLoRA init."""

import pytest
import torch
from transformers.pytorch_utils import Conv1D

import peftc
from rewrite.spec import SpecError
from tests.oracle import TOL, OneLayer, one_linear, perturbed


def merged_weight(one: OneLayer) -> torch.Tensor:
    return one.adapted.merge().get_submodule("0").weight.detach()


def test_slora_init_forward_and_merge_equal_the_formula():
    one = one_linear("nlora", rank=4, alpha=6.0)
    t = one.tensors()
    assert not t["nlora_B"].any()  # B zero: the identity at init
    # Kaiming-uniform, a = √5: bound 1/√fan_in (in = 24 for A, r = 4 for N)
    assert 0.5 / 24**0.5 < t["nlora_A"].abs().max() <= 1 / 24**0.5
    assert 0.25 < t["nlora_N"].abs().max() <= 0.5
    assert set(t) == {"nlora_A", "nlora_N", "nlora_B"}  # no frozen tensors
    torch.testing.assert_close(one.out(), one.base_out(), atol=TOL, rtol=TOL)

    t = perturbed(one).tensors()
    W, b = one.layer.weight.detach(), one.layer.bias.detach()
    delta = (6.0 / 4) * t["nlora_B"] @ t["nlora_N"] @ t["nlora_A"]
    expected = one.x @ (W + delta).T + b
    assert (expected - one.base_out()).abs().max() > 1e-3
    torch.testing.assert_close(one.out(), expected, atol=TOL, rtol=TOL)
    torch.testing.assert_close(merged_weight(one), W + delta, atol=TOL, rtol=TOL)


def test_nystrom_init_forward_and_merge_equal_the_formula():
    one = one_linear("nlora", rank=4, init="nystrom")
    t, W, b = one.tensors(), one.layer.weight.detach(), one.layer.bias.detach()
    pinv = torch.linalg.pinv(W[:4, :4])
    for name, want in {"A": W[:4], "N": pinv, "B": W[:, :4]}.items():
        torch.testing.assert_close(t[f"nlora_{name}"], want, atol=TOL, rtol=TOL)
        torch.testing.assert_close(t[f"nlora_{name}0"], want, atol=TOL, rtol=TOL)
    params = one.adapted.named_adapter_parameters()
    assert [k for k, p in params.items() if p.requires_grad] == [
        "adapters.0.nlora_A",
        "adapters.0.nlora_N",
        "adapters.0.nlora_B",
    ]
    # the Nyström form reproduces W's first r rows and columns
    nys = t["nlora_B"] @ t["nlora_N"] @ t["nlora_A"]
    torch.testing.assert_close(nys[:4], W[:4], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(nys[:, :4], W[:, :4], atol=1e-4, rtol=1e-4)
    # the initial product is subtracted: the model starts as the base
    torch.testing.assert_close(one.out(), one.base_out(), atol=TOL, rtol=TOL)

    t = perturbed(one).tensors()
    delta = (
        t["nlora_B"] @ t["nlora_N"] @ t["nlora_A"] - t["nlora_B0"] @ t["nlora_N0"] @ t["nlora_A0"]
    )
    expected = one.x @ (W + 2.0 * delta).T + b  # s = alpha/r = 8/4 (alpha's default, 8)
    assert (expected - one.base_out()).abs().max() > 1e-3
    torch.testing.assert_close(one.out(), expected, atol=TOL, rtol=TOL)
    torch.testing.assert_close(merged_weight(one), W + 2.0 * delta, atol=TOL, rtol=TOL)


def test_nystrom_checkpoint_rebuilds_the_frozen_copies(tmp_path):
    """Only A, N, B are saved; A₀, N₀, B₀ come back from W when the adapter loads."""
    one = perturbed(one_linear("nlora", rank=4, init="nystrom"))
    one.adapted.save_adapter(str(tmp_path))
    fresh = one_linear("nlora", rank=4, init="nystrom")
    assert (fresh.out(one.x) - one.out()).abs().max() > 1e-3
    fresh.adapted.load_adapter(str(tmp_path))
    torch.testing.assert_close(fresh.out(one.x), one.out(), atol=TOL, rtol=TOL)


def test_addmm_site_uses_the_logical_weight():
    """GPT-2's Conv1D stores W as [in, out]; the Nyström factors slice the logical [out, in]."""
    torch.manual_seed(0)
    layer = Conv1D(16, 24)
    spec = {"adapters": [{"method": "nlora", "targets": ["0"], "rank": 4, "init": "nystrom"}]}
    adapted = peftc.compile(torch.nn.Sequential(layer), spec, (torch.randn(2, 5, 24),)).eval()
    x = torch.randn(3, 7, 24)
    one = OneLayer(layer, adapted, x)
    W = layer.weight.detach().T
    torch.testing.assert_close(one.tensors()["nlora_A0"], W[:4], atol=TOL, rtol=TOL)
    torch.testing.assert_close(one.out(), one.base_out(), atol=TOL, rtol=TOL)
    t = perturbed(one).tensors()
    delta = (
        t["nlora_B"] @ t["nlora_N"] @ t["nlora_A"] - t["nlora_B0"] @ t["nlora_N0"] @ t["nlora_A0"]
    )
    expected = x @ (W + 2.0 * delta).T + layer.bias
    assert (expected - one.base_out()).abs().max() > 1e-3
    torch.testing.assert_close(one.out(), expected, atol=TOL, rtol=TOL)


def test_slora_with_identity_core_is_lora():
    """peftc's lora with the same A, B and scale equals SLoRA with N = I."""
    one = perturbed(one_linear("nlora", rank=4, alpha=6.0))
    with torch.no_grad():
        one.adapted.named_adapter_parameters()["adapters.0.nlora_N"].copy_(torch.eye(4))
    t = one.tensors()
    lora = one_linear("lora", rank=4, alpha=6.0)
    with torch.no_grad():
        params = lora.adapted.named_adapter_parameters()
        params["adapters.0.lora_A"].copy_(t["nlora_A"])
        params["adapters.0.lora_B"].copy_(t["nlora_B"])
    assert (one.out() - one.base_out()).abs().max() > 1e-3
    torch.testing.assert_close(lora.out(one.x), one.out(), atol=TOL, rtol=TOL)


def test_refusals_name_the_reason():
    with pytest.raises(SpecError, match=r"nlora: init \(the initialisation\) must be one of"):
        one_linear("nlora", rank=4, init="svd")
    with pytest.raises(SpecError, match=r"rank 20 is larger than the layer allows"):
        one_linear("nlora", rank=20)
    with pytest.raises(SpecError, match="nlora supports linear layers only, not conv2d sites"):
        conv = torch.nn.Sequential(torch.nn.Conv2d(4, 4, 3))
        spec = {"adapters": [{"method": "nlora", "targets": ["0"], "rank": 2}]}
        peftc.compile(conv, spec, (torch.randn(2, 4, 5, 5),))
