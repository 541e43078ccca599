"""The additive Spectral Adapter against the reference formula W' = (U_r + B)·diag(S_r)·(V_r + A)ᵀ
+ W_res (linear and GPT-2's addmm), its SVD init, the identity at init with non-zero
gradients, and its refusals (fp32, 1e-5). The method-generic checks are tests/test_methods.py's
and its siblings'."""

import pytest
import torch

import peftc
from tests.oracle import TOL, OneLayer, one_conv1d, one_linear, perturbed


def reference_weight(W, U, S, V, A, B):
    """W' = (U_r + B)·diag(S_r)·(V_r + A)ᵀ + W_res, W_res = W − U_r·diag(S_r)·V_rᵀ."""
    W_res = W - U @ torch.diag(S) @ V.T
    return (U + B) @ torch.diag(S) @ (V + A).T + W_res


def check_forward_and_merge(one: OneLayer, W: torch.Tensor) -> None:
    t, b = one.tensors(), one.layer.bias.detach()
    W_new = reference_weight(W, *(t[f"spectral_{k}"] for k in "USVAB"))
    expected = one.x @ W_new.T + b
    assert (expected - one.base_out()).abs().max() > 1e-3  # a visible update
    torch.testing.assert_close(one.out(), expected, atol=TOL, rtol=TOL)
    merged = one.merged_weight()
    torch.testing.assert_close(merged, W_new, atol=TOL, rtol=TOL)


def test_init_is_the_top_singular_triplets_and_zeros():
    one = one_linear("spectral", rank=4)
    t, W = one.tensors(), one.layer.weight.detach()
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    torch.testing.assert_close(t["spectral_S"], S[:4], atol=TOL, rtol=TOL)
    # the singular vectors up to sign: |Uᵀ·U_r| is the identity
    torch.testing.assert_close((U[:, :4].T @ t["spectral_U"]).abs(), torch.eye(4), atol=TOL, rtol=0)
    torch.testing.assert_close((Vh[:4] @ t["spectral_V"]).abs(), torch.eye(4), atol=TOL, rtol=0)
    torch.testing.assert_close(
        t["spectral_U"] @ torch.diag(t["spectral_S"]) @ t["spectral_V"].T,
        U[:, :4] @ torch.diag(S[:4]) @ Vh[:4],
        atol=TOL,
        rtol=TOL,
    )
    assert not t["spectral_A"].any() and not t["spectral_B"].any()
    params = one.adapted.named_adapter_parameters()
    assert {k.rsplit(".", 1)[-1] for k, p in params.items() if p.requires_grad} == {
        "spectral_A",
        "spectral_B",
    }


def test_identity_at_init_with_non_zero_gradients_through_S():
    """Output == base exactly at init, but A and B get the reference's (non-zero) gradients:
    dL/dA = xᵀ·g·(U_r + B)·S_r and dL/dB = gᵀ·x·(V_r + A)·S_r, both non-zero at A = B = 0."""
    one = one_linear("spectral", rank=4)
    t, W, b, x = one.tensors(), one.layer.weight.detach(), one.layer.bias.detach(), one.x
    assert torch.equal(one.out(), one.base_out())
    params = one.adapted.named_adapter_parameters()
    one.adapted.zero_grad(set_to_none=True)
    (one.adapted(x) ** 2).sum().backward()
    A = torch.zeros_like(t["spectral_A"], requires_grad=True)
    B = torch.zeros_like(t["spectral_B"], requires_grad=True)
    W_new = reference_weight(W, t["spectral_U"], t["spectral_S"], t["spectral_V"], A, B)
    ((x @ W_new.T + b) ** 2).sum().backward()
    for name, want in (("spectral_A", A.grad), ("spectral_B", B.grad)):
        got = params[f"adapters.0.{name}"].grad
        assert got.abs().max() > 1e-2, name  # the identity, yet it trains
        torch.testing.assert_close(got, want, atol=TOL, rtol=TOL)


def test_forward_and_merge_equal_the_reference_formula():
    one = perturbed(one_linear("spectral", rank=4))
    check_forward_and_merge(one, one.layer.weight.detach())


def test_addmm_site_equals_the_reference_formula():
    one = perturbed(one_conv1d("spectral", rank=4))
    check_forward_and_merge(one, one.layer.weight.detach().T)


def test_refuses_conv_layers_and_a_rank_above_the_layer():
    with pytest.raises(Exception, match=r"rank 20 is larger than the layer's number of singular"):
        one_linear("spectral", in_features=24, out_features=16, rank=20)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3))
    spec = {"adapters": [{"method": "spectral", "targets": ["0"], "rank": 2}]}
    with pytest.raises(Exception, match=r"spectral supports linear layers only, not conv2d"):
        peftc.compile(model, spec, (torch.randn(2, 3, 8, 8),))
