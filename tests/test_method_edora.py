"""EDoRA against the reference formula (linear and GPT-2's addmm), its init, its detached norm,
and peftc's DoRA with lora_A = R·A, lora_B = B and the same magnitude (fp32, 1e-5). The
method-generic checks (merge, gradients, checkpoints, bf16, ONNX, counts) are
tests/test_methods.py's and its siblings'."""

import pytest
import torch

import peftc
from tests.oracle import TOL, OneLayer, one_conv1d, one_linear, perturbed


def reference(x, W, b, R, A, B, m, s):
    """y = base + (m/‖W + sBRA‖ − 1)⊙(x·Wᵀ) + (m/‖·‖)⊙s·x·(BRA)ᵀ, the norm detached."""
    norm = torch.linalg.norm(W + s * B @ R @ A, dim=1).detach()
    scale = m / norm
    return x @ W.T + b + (scale - 1) * (x @ W.T) + scale * s * (x @ (B @ R @ A).T)


def check_forward_and_merge(one: OneLayer, W: torch.Tensor, s: float) -> None:
    t, b = one.tensors(), one.layer.bias.detach()
    expected = reference(one.x, W, b, *(t[f"edora_{k}"] for k in ("R", "A", "B", "magnitude")), s)
    assert (expected - one.base_out()).abs().max() > 1e-3  # a visible update
    torch.testing.assert_close(one.out(), expected, atol=TOL, rtol=TOL)
    V = W + s * t["edora_B"] @ t["edora_R"] @ t["edora_A"]
    merged = one.merged_weight()
    want = V * (t["edora_magnitude"] / torch.linalg.norm(V, dim=1))[:, None]
    torch.testing.assert_close(merged, want, atol=TOL, rtol=TOL)


def test_init_is_loraxs_factors_and_row_norms():
    """A = S_r·V_rᵀ, B = U_r (up to signs, which cancel in B·A), m = ‖W‖ per row, R tiny: the
    model moves at init, by about init_sigma."""
    one = one_linear("edora", rank=4)
    t, W = one.tensors(), one.layer.weight.detach()
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    torch.testing.assert_close(
        t["edora_B"] @ t["edora_A"], U[:, :4] @ torch.diag(S[:4]) @ Vh[:4], atol=TOL, rtol=TOL
    )
    torch.testing.assert_close(t["edora_magnitude"], torch.linalg.norm(W, dim=1))
    assert 0 < t["edora_R"].abs().max() < 1e-4
    params = one.adapted.named_adapter_parameters()
    trainable = {k.rsplit(".", 1)[-1] for k, p in params.items() if p.requires_grad}
    assert trainable == {"edora_R", "edora_magnitude"}
    moved = (one.out() - one.base_out()).abs().max()
    assert 0 < moved < 1e-3
    wide = one_linear("edora", rank=8, init_sigma=0.5).tensors()["edora_R"]
    assert 0.3 < wide.std() < 0.7


def test_forward_and_merge_equal_the_reference_formula():
    one = perturbed(one_linear("edora", rank=4, alpha=6.0))
    check_forward_and_merge(one, one.layer.weight.detach(), 6.0 / 4)


def test_addmm_site_equals_the_reference_formula():
    one = perturbed(one_conv1d("edora", rank=4))
    check_forward_and_merge(one, one.layer.weight.detach().T, 16.0 / 4)


def test_the_norm_is_detached_from_the_gradient():
    """R's and m's gradients equal the reference's with the norm detached (as DoRA §4.3),
    which differ from those through the norm."""
    one = perturbed(one_linear("edora", rank=4), std=0.3)
    params = one.adapted.named_adapter_parameters()
    t, W, b = one.tensors(), one.layer.weight.detach(), one.layer.bias.detach()
    one.adapted.zero_grad(set_to_none=True)
    (one.adapted(one.x) ** 2).sum().backward()
    R, m = t["edora_R"].clone().requires_grad_(), t["edora_magnitude"].clone().requires_grad_()
    A, B, s = t["edora_A"], t["edora_B"], 16.0 / 4
    (reference(one.x, W, b, R, A, B, m, s) ** 2).sum().backward()
    torch.testing.assert_close(params["adapters.0.edora_R"].grad, R.grad, atol=TOL, rtol=TOL)
    torch.testing.assert_close(
        params["adapters.0.edora_magnitude"].grad, m.grad, atol=TOL, rtol=TOL
    )
    R2 = t["edora_R"].clone().requires_grad_()
    V = W + s * B @ R2 @ A
    through = one.x @ (V * (m.detach() / torch.linalg.norm(V, dim=1))[:, None]).T + b
    (through**2).sum().backward()
    assert (R2.grad - R.grad).abs().max() > 1e-2


def test_equals_dora_with_the_same_effective_factors():
    """peftc's DoRA with lora_A = R·A, lora_B = B, the same magnitude and scale computes the
    same output: EDoRA is DoRA restricted to W's top singular subspace."""
    one = perturbed(one_linear("edora", rank=4, alpha=8.0))
    t = one.tensors()
    dora = one_linear("dora", rank=4, alpha=8.0)
    with torch.no_grad():
        params = dora.adapted.named_adapter_parameters()
        params["adapters.0.lora_A"].copy_(t["edora_R"] @ t["edora_A"])
        params["adapters.0.lora_B"].copy_(t["edora_B"])
        params["adapters.0.magnitude"].copy_(t["edora_magnitude"])
    assert (one.out() - one.base_out()).abs().max() > 1e-3
    torch.testing.assert_close(dora.out(one.x), one.out(), atol=TOL, rtol=TOL)


def test_refuses_conv_layers_and_a_rank_above_the_layer():
    with pytest.raises(Exception, match=r"rank 20 is larger than the layer allows"):
        one_linear("edora", in_features=24, out_features=16, rank=20)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3))
    spec = {"adapters": [{"method": "edora", "targets": ["0"], "rank": 2}]}
    with pytest.raises(Exception, match=r"edora supports linear layers only, not conv2d"):
        peftc.compile(model, spec, (torch.randn(2, 3, 8, 8),))
