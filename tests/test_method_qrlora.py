"""QR-LoRA against the reference formula (fp32, 1e-5): the QR init of the SVD core, the
upper-triangular mask on ΔR, the merged weight, LoRA with the same product, and the refusals.
The method-generic checks are tests/test_methods.py's and its siblings'."""

import pytest
import torch

import peftc
from passes.merge import merged_weights
from rewrite.spec import SpecError
from tests.oracle import TOL, one_linear, perturbed


def reference(W: torch.Tensor, r: int, s: float):
    """core = U_r·diag(S_r/s)·V_rᵀ; Q, R = qr(core); (Q[:, :r], R[:r])."""
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    core = U[:, :r] @ torch.diag(S[:r] / s) @ Vh[:r]
    Q, R = torch.linalg.qr(core, mode="reduced")
    return Q[:, :r], R[:r]


def test_forward_init_and_merge_equal_the_reference_formula():
    one = perturbed(one_linear("qrlora", rank=4, alpha=2.0))  # s = 1/2
    t, W, b = one.tensors(), one.layer.weight.detach(), one.layer.bias.detach()
    Q, R0 = reference(W, 4, 0.5)
    torch.testing.assert_close(t["qrlora_Q"], Q, atol=TOL, rtol=TOL)
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)  # s·Q·R₀ is W's top-4 part
    torch.testing.assert_close(0.5 * Q @ R0, U[:, :4] * S[:4] @ Vh[:4], atol=TOL, rtol=TOL)
    W_res = W - 0.5 * Q @ R0
    mask = torch.ones(4, 24).triu()
    W_new = W_res + 0.5 * Q @ (R0 + t["qrlora_delta_R"] * mask)
    expected = one.x @ W_new.T + b
    assert (expected - one.base_out()).abs().max() > 1e-3
    torch.testing.assert_close(one.out(), expected, atol=TOL, rtol=TOL)
    merged = merged_weights(one.adapted.plan.assignments, one.adapted.state())["0"]
    torch.testing.assert_close(merged, W_new, atol=TOL, rtol=TOL)


def test_delta_r_starts_at_zero_and_only_it_trains():
    one = one_linear("qrlora", rank=4)
    params = one.adapted.named_adapter_parameters()
    assert [k for k, v in params.items() if v.requires_grad] == ["adapters.0.qrlora_delta_R"]
    assert torch.equal(params["adapters.0.qrlora_delta_R"], torch.zeros(4, 24))


def test_the_lower_triangle_of_delta_r_has_no_effect_and_no_gradient():
    one = perturbed(one_linear("qrlora", rank=4))
    delta = one.adapted.named_adapter_parameters()["adapters.0.qrlora_delta_R"]
    before = one.out()
    with torch.no_grad():
        delta.add_(torch.ones(4, 24).tril(-1) * 5.0)
    torch.testing.assert_close(one.out(), before, atol=0, rtol=0)
    one.adapted(one.x).sum().backward()
    assert (delta.grad.tril(-1) == 0).all() and (delta.grad.triu() != 0).any()


def test_equals_lora_with_the_same_product():
    """LoRA with lora_A = triu(ΔR), lora_B = Q and the same scale computes the same output."""
    one = perturbed(one_linear("qrlora", rank=4, alpha=2.0))
    t = one.tensors()
    lora = one_linear("lora", rank=4, alpha=2.0)
    with torch.no_grad():
        params = lora.adapted.named_adapter_parameters()
        params["adapters.0.lora_A"].copy_(t["qrlora_delta_R"].triu())
        params["adapters.0.lora_B"].copy_(t["qrlora_Q"])
    assert (one.out() - one.base_out()).abs().max() > 1e-3
    torch.testing.assert_close(lora.out(one.x), one.out(), atol=TOL, rtol=TOL)


def test_rank_above_the_layer_is_refused():
    with pytest.raises(SpecError, match=r"rank 20 is larger than the layer allows.*lower the rank"):
        one_linear("qrlora", rank=20)


def test_conv2d_is_refused():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(4, 6, 3))
    spec = {"adapters": [{"method": "qrlora", "targets": ["0"], "rank": 2}]}
    with pytest.raises(SpecError, match="qrlora supports linear layers only, not conv2d sites"):
        peftc.compile(model, spec, (torch.randn(2, 4, 8, 8),))


def test_alpha_must_be_positive():
    with pytest.raises(
        SpecError,
        match=r"qrlora: alpha must be null \(alpha = rank.*or a positive number, got -1.0",
    ):
        one_linear("qrlora", rank=4, alpha=-1.0)
