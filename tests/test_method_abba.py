"""ABBA against the reference formula (fp32, 1e-5): the SVD init of A1/B1, the zero B2, the
Hadamard-product forward and merged weight, and LoRA as the special case B2·A2 = all-ones.
The method-generic checks are tests/test_methods.py's and its siblings'."""

import pytest
import torch

import peftc
from tests.oracle import TOL, one_linear, perturbed


def _delta(t: dict, s: float) -> torch.Tensor:
    return s * (t["abba_B1"] @ t["abba_A1"]) * (t["abba_B2"] @ t["abba_A2"])


def _with_spectrum(one):
    """Give the base weight a clear top-4 spectrum (the reference's svd_lowrank, q = r with no
    oversampling, finds the top subspace only where there is a gap) and recompile."""
    g = torch.Generator().manual_seed(3)
    U, _ = torch.linalg.qr(torch.randn(16, 16, generator=g))
    V, _ = torch.linalg.qr(torch.randn(24, 16, generator=g))
    S = torch.tensor([5.0, 4.0, 3.0, 2.0] + [0.01] * 12)
    with torch.no_grad():
        one.layer.weight.copy_(U @ torch.diag(S) @ V.T)
    spec = {"adapters": [{"method": "abba", "targets": ["0"], "rank": 4}]}
    model = torch.nn.Sequential(one.layer)
    one.adapted = peftc.compile(model, spec, (torch.randn(2, 5, 24),)).eval()
    return one, U[:, :4] @ torch.diag(S[:4]) @ V[:, :4].T, S[:4]


def test_init_is_the_truncated_svd_and_zero_b2():
    """B1·A1 = the top-4 SVD approximation of W (√S on each side: the factors' Gram matrices
    are both diag(S)); A2 Kaiming-uniform (a = 0); B2 = 0, so the output is the base's."""
    one, top4, S = _with_spectrum(one_linear("abba", rank=4))
    t = one.tensors()
    torch.testing.assert_close(t["abba_B1"] @ t["abba_A1"], top4, atol=1e-4, rtol=1e-4)
    gram_a, gram_b = t["abba_A1"] @ t["abba_A1"].T, t["abba_B1"].T @ t["abba_B1"]
    torch.testing.assert_close(gram_a, torch.diag(S), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(gram_b, torch.diag(S), atol=1e-4, rtol=1e-4)
    assert torch.equal(t["abba_B2"], torch.zeros(16, 4))
    bound = (6 / 24) ** 0.5  # Kaiming-uniform with a = 0 on fan_in 24
    assert t["abba_A2"].abs().max() <= bound and t["abba_A2"].std() > bound / 4
    assert all(v.requires_grad for v in one.adapted.named_adapter_parameters().values())
    torch.testing.assert_close(one.out(), one.base_out(), atol=0, rtol=0)


def test_init_is_deterministic():
    a, b = one_linear("abba", rank=4).tensors(), one_linear("abba", rank=4).tensors()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_forward_and_merge_equal_the_reference_formula():
    """y = x·Wᵀ + b + x·ΔWᵀ with ΔW = s·(B1A1) ⊙ (B2A2), s = alpha."""
    one = perturbed(one_linear("abba", rank=4, alpha=3.0))
    t, W, b = one.tensors(), one.layer.weight.detach(), one.layer.bias.detach()
    expected = one.x @ (W + _delta(t, 3.0)).T + b
    assert (expected - one.base_out()).abs().max() > 1e-3
    torch.testing.assert_close(one.out(), expected, atol=TOL, rtol=TOL)
    a = one.adapted.plan.assignments[0]
    merged = a.method.merged_weight(a.site, W, {k: v for k, v in t.items()})
    torch.testing.assert_close(merged, W + _delta(t, 3.0), atol=TOL, rtol=TOL)


def test_alpha_defaults_to_rank():
    one = perturbed(one_linear("abba", rank=4))
    t, W, b = one.tensors(), one.layer.weight.detach(), one.layer.bias.detach()
    torch.testing.assert_close(one.out(), one.x @ (W + _delta(t, 4.0)).T + b, atol=TOL, rtol=TOL)


def test_equals_lora_when_the_second_product_is_all_ones():
    """With B2·A2 = 1 (B2 = 1/r, A2 = 1) ΔW = s·B1·A1: a LoRA with the same factors."""
    one = one_linear("abba", rank=4, alpha=2.0)
    lora = one_linear("lora", rank=4, alpha=8.0)  # s = 2 for lora: alpha / rank
    with torch.no_grad():
        params = one.adapted.named_adapter_parameters()
        params["adapters.0.abba_B2"].fill_(0.25)
        params["adapters.0.abba_A2"].fill_(1.0)
        params["adapters.0.abba_B1"].add_(0.1)
        t = one.tensors()
        lp = lora.adapted.named_adapter_parameters()
        lp["adapters.0.lora_A"].copy_(t["abba_A1"])
        lp["adapters.0.lora_B"].copy_(t["abba_B1"])
    assert (one.out() - one.base_out()).abs().max() > 1e-3
    torch.testing.assert_close(lora.out(one.x), one.out(), atol=TOL, rtol=TOL)


def test_refuses_a_rank_above_the_layer_and_conv_layers():
    with pytest.raises(Exception, match=r"rank 20 is larger than the layer allows"):
        one_linear("abba", in_features=24, out_features=16, rank=20)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3))
    spec = {"adapters": [{"method": "abba", "targets": ["0"], "rank": 2}]}
    with pytest.raises(Exception, match=r"abba supports linear layers only, not conv2d"):
        peftc.compile(model, spec, (torch.randn(2, 3, 8, 8),))
