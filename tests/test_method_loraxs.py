"""LoRA-XS against the reference formula and against LoRA with the same B·R·A (fp32, 1e-5).
The method-generic checks (merge, gradients, checkpoints, bf16, ONNX, counts) are
tests/test_methods.py's and its siblings'."""

import torch

import peftc
from tests.oracle import TOL, one_linear, perturbed


def test_forward_equals_the_reference_formula():
    """A = S_r·V_rᵀ and B = U_r from the SVD of W (up to the singular vectors' signs, which
    cancel in B·A), and y = x·Wᵀ + b + s·x·(B·R·A)ᵀ with s = alpha/r."""
    one = perturbed(one_linear("loraxs", rank=4, alpha=6.0))
    t, W, b = one.tensors(), one.layer.weight.detach(), one.layer.bias.detach()
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    top4 = U[:, :4] @ torch.diag(S[:4]) @ Vh[:4]
    torch.testing.assert_close(t["loraxs_B"] @ t["loraxs_A"], top4, atol=TOL, rtol=TOL)
    assert not t["loraxs_A"].requires_grad and t["loraxs_R"].shape == (4, 4)
    x = one.x
    expected = x @ W.T + b + (6.0 / 4) * x @ (t["loraxs_B"] @ t["loraxs_R"] @ t["loraxs_A"]).T
    assert (expected - one.base_out()).abs().max() > 1e-3  # a visible update
    torch.testing.assert_close(one.out(), expected, atol=TOL, rtol=TOL)


def test_equals_lora_with_the_same_effective_product():
    """PEFT's close relative: a LoRA with lora_A = R·A, lora_B = B (same scale) computes the
    same output, so LoRA-XS is LoRA restricted to W's top singular subspace."""
    one = perturbed(one_linear("loraxs", rank=4))
    t = one.tensors()
    lora = one_linear("lora", rank=4, alpha=4.0)
    with torch.no_grad():
        params = lora.adapted.named_adapter_parameters()
        params["adapters.0.lora_A"].copy_(t["loraxs_R"] @ t["loraxs_A"])
        params["adapters.0.lora_B"].copy_(t["loraxs_B"])
    assert (one.out() - one.base_out()).abs().max() > 1e-3
    torch.testing.assert_close(lora.out(one.x), one.out(), atol=TOL, rtol=TOL)


def test_init_sigma_sets_the_spread_of_R():
    one = one_linear("loraxs", rank=8, init_sigma=0.5)
    assert 0.3 < one.tensors()["loraxs_R"].std() < 0.7
    assert isinstance(one.adapted, peftc.AdaptedModel)


def test_shared_svd_fixes_each_pairs_sign():
    """The factors rebuilt from W on load carry one sign per singular pair by rule (the entry
    of U's column largest in magnitude is positive), whatever sign LAPACK returns."""
    from passes.adapters.svd import svd

    W = torch.randn(12, 20, generator=torch.Generator().manual_seed(3))
    U, S, Vh = svd(W)
    torch.testing.assert_close(U @ torch.diag(S) @ Vh, W, atol=TOL, rtol=TOL)
    peaks = U.gather(0, U.abs().argmax(0, keepdim=True))
    assert (peaks > 0).all()
    U2, _, Vh2 = svd(-W)  # LAPACK's signs for -W differ; the rule gives U the same signs
    torch.testing.assert_close(U2, U, atol=TOL, rtol=TOL)
    torch.testing.assert_close(Vh2, -Vh, atol=TOL, rtol=TOL)
