"""MultiLoRA against the paper's formula (fp32, 1e-5), its init as the paper's text says
(there is no official code), against LoRA of rank n·r, and its refusals. The method-generic
checks (merge, gradients, checkpoints, bf16, ONNX, counts) are tests/test_methods.py's and
its siblings'."""

import math

import pytest
import torch

from tests.oracle import TOL, one_conv2d, one_linear, perturbed


def test_init_scalars_zero_and_both_factors_kaiming_uniform():
    """sᵢ = 0 (the identity); Aᵢ (r×in) and Bᵢ (out×r) both Kaiming-uniform with a = √5:
    bounds 1/√in and 1/√r, filled (not zero), and the n modules differ."""
    one = one_linear("multilora", in_features=48, out_features=40, rank=4, num_adapters=3)
    t = one.tensors()
    A, B, s = t["multilora_A"], t["multilora_B"], t["multilora_scale"]
    assert A.shape == (3, 4, 48) and B.shape == (40, 3, 4) and torch.equal(s, torch.zeros(3))
    for factor, fan_in in ((A, 48), (B, 4)):
        bound = 1 / math.sqrt(fan_in)  # gain √(2/(1+5)) · √(3/fan_in)
        assert factor.abs().max() <= bound and factor.abs().max() > 0.8 * bound
        assert factor.std() > 0.4 * bound
    assert not torch.equal(A[0], A[1]) and not torch.equal(B[:, 0], B[:, 1])
    torch.testing.assert_close(one.out(), one.base_out(), atol=0, rtol=0)


def test_forward_and_merge_equal_the_reference_formula():
    """y = x·Wᵀ + b + c·Σᵢ sᵢ·x·Aᵢᵀ·Bᵢᵀ with c = alpha/rank; merged W + c·Σᵢ sᵢ·BᵢAᵢ."""
    one = perturbed(one_linear("multilora", rank=4, num_adapters=3, alpha=6.0), std=0.5)
    t, W, b = one.tensors(), one.layer.weight.detach(), one.layer.bias.detach()
    A, B, s, c = t["multilora_A"], t["multilora_B"], t["multilora_scale"], 6.0 / 4
    x = one.x
    expected = x @ W.T + b
    for i in range(3):
        expected = expected + c * s[i] * (x @ A[i].T @ B[:, i].T)
    assert (expected - one.base_out()).abs().max() > 1e-3  # a visible update
    torch.testing.assert_close(one.out(), expected, atol=TOL, rtol=TOL)
    merged = one.adapted.merge()
    Wm = W + c * sum(s[i] * B[:, i] @ A[i] for i in range(3))
    torch.testing.assert_close(merged(x), x @ Wm.T + b, atol=TOL, rtol=TOL)


def test_equals_lora_of_rank_n_times_r():
    """peftc's close relative: LoRA of rank n·r with lora_A = [A₁; …; Aₙ] and lora_B =
    [s₁B₁ … sₙBₙ] (the same scale c) computes the same output."""
    one = perturbed(one_linear("multilora", rank=2, num_adapters=3), std=0.5)
    t = one.tensors()
    A, B, s = t["multilora_A"], t["multilora_B"], t["multilora_scale"]
    lora = one_linear("lora", rank=6, alpha=6.0)  # c = 1 on both sides
    with torch.no_grad():
        params = lora.adapted.named_adapter_parameters()
        params["adapters.0.lora_A"].copy_(A.reshape(6, -1))
        params["adapters.0.lora_B"].copy_((B * s[:, None]).reshape(B.shape[0], 6))
    assert (one.out() - one.base_out()).abs().max() > 1e-3
    torch.testing.assert_close(lora.out(one.x), one.out(), atol=TOL, rtol=TOL)


def test_refuses_rank_above_the_layer():
    with pytest.raises(Exception, match=r"rank 32 is larger than the layer allows"):
        one_linear("multilora", rank=32)


def test_refuses_conv2d():
    with pytest.raises(Exception, match=r"multilora supports linear layers only, not conv2d"):
        one_conv2d("multilora", rank=2)
