"""LoRMA against the reference formulas (fp32, 1e-5), in each of its forms (pre/post × rri and
shift), on linear and GPT-2 Conv1D (addmm) sites: init, forward and merged weight. The
method-generic checks are tests/test_methods.py's and its siblings'."""

import math

import pytest
import torch
from transformers.pytorch_utils import Conv1D

import peftc
from tests.oracle import TOL, OneLayer, one_linear, perturbed

FORMS = [("pre", "rri"), ("post", "rri"), ("pre", "shift"), ("post", "shift")]


def _shift(M: torch.Tensor) -> torch.Tensor:
    """The reference's shift: gather with indices (j − i) mod n."""
    n = M.shape[1]
    idx = (torch.arange(n)[None, :] - torch.arange(M.shape[0])[:, None]) % n
    return torch.gather(M, 1, idx)


def _adapted_weight(W: torch.Tensor, t: dict, side: str, inflation: str, s: float):
    A, B = t["lorma_A"], t["lorma_B"]
    if inflation == "rri":
        return W + s * (B @ (A @ W) if side == "pre" else (W @ B) @ A)
    return s * (_shift(B @ A) @ W if side == "pre" else W @ _shift(B @ A))


@pytest.mark.parametrize("side,inflation", FORMS)
def test_forward_and_merge_equal_the_reference_formula(side, inflation):
    """y = x·W'ᵀ + b with the reference's W' of each form (s = alpha/rank)."""
    hyper = {"rank": 4, "alpha": 6.0, "side": side, "rank_inflation": inflation}
    one = perturbed(one_linear("lorma", **hyper), std=0.05)
    t, W, b = one.tensors(), one.layer.weight.detach(), one.layer.bias.detach()
    n = 16 if side == "pre" else 24
    assert t["lorma_A"].shape == (4, n) and t["lorma_B"].shape == (n, 4)
    W_ = _adapted_weight(W, t, side, inflation, 1.5)
    expected = one.x @ W_.T + b
    assert (expected - one.base_out()).abs().max() > 1e-3
    torch.testing.assert_close(one.out(), expected, atol=TOL, rtol=TOL)
    a = one.adapted.plan.assignments[0]
    torch.testing.assert_close(a.method.merged_weight(a.site, W, t), W_, atol=TOL, rtol=TOL)


@pytest.mark.parametrize("side", ["pre", "post"])
def test_rri_init_is_zero_b_and_kaiming_a(side):
    one = one_linear("lorma", rank=4, side=side)
    t, n = one.tensors(), (16 if side == "pre" else 24)
    assert torch.equal(t["lorma_B"], torch.zeros(n, 4))
    bound = 1 / math.sqrt(n)  # Kaiming-uniform with a = √5 on fan_in n
    assert t["lorma_A"].abs().max() <= bound and t["lorma_A"].std() > bound / 4
    torch.testing.assert_close(one.out(), one.base_out(), atol=0, rtol=0)


@pytest.mark.parametrize("side", ["pre", "post"])
def test_shift_init_makes_the_scaled_shift_the_identity(side):
    """B: Kaiming with column 0 set to 1, A = e₀₀, both divided by √s: s·shift(B·A) = I."""
    one = one_linear("lorma", rank=4, alpha=12.0, side=side, rank_inflation="shift")
    t, n, s = one.tensors(), (16 if side == "pre" else 24), 3.0
    A, B = t["lorma_A"] * math.sqrt(s), t["lorma_B"] * math.sqrt(s)
    expected_A = torch.zeros(4, n)
    expected_A[0, 0] = 1.0
    torch.testing.assert_close(A, expected_A, atol=TOL, rtol=TOL)
    torch.testing.assert_close(B[:, 0], torch.ones(n), atol=TOL, rtol=TOL)
    assert B[:, 1:].abs().max() <= 1 / math.sqrt(4) and B[:, 1:].std() > 0.05
    torch.testing.assert_close(
        s * _shift(t["lorma_B"] @ t["lorma_A"]), torch.eye(n), atol=TOL, rtol=TOL
    )
    torch.testing.assert_close(one.out(), one.base_out(), atol=TOL, rtol=TOL)


def _one_conv1d(**hyper) -> OneLayer:
    """GPT-2's Conv1D: an addmm site, weight stored [in, out]."""
    torch.manual_seed(0)
    layer = Conv1D(16, 24)  # nf = out, nx = in
    with torch.no_grad():
        layer.bias.normal_()
    spec = {"adapters": [{"method": "lorma", "targets": ["0"], **hyper}]}
    adapted = peftc.compile(torch.nn.Sequential(layer), spec, (torch.randn(2, 5, 24),)).eval()
    return OneLayer(
        layer, adapted, torch.randn(3, 7, 24, generator=torch.Generator().manual_seed(1))
    )


@pytest.mark.parametrize("side,inflation", [("pre", "rri"), ("pre", "shift"), ("post", "rri")])
def test_addmm_sites(side, inflation):
    """On GPT-2's Conv1D (W stored transposed, a bias): the same formula on the logical W."""
    one = perturbed(_one_conv1d(rank=4, side=side, rank_inflation=inflation))
    t, W, b = one.tensors(), one.layer.weight.detach().T, one.layer.bias.detach()
    expected = one.x @ _adapted_weight(W, t, side, inflation, 4.0).T + b
    assert (expected - one.base_out()).abs().max() > 1e-3
    torch.testing.assert_close(one.out(), expected, atol=TOL, rtol=TOL)


def test_pre_rri_is_a_lora_whose_a_reads_the_base_output():
    """pre + rri: x·(B·A·W)ᵀ = (x·Wᵀ)·Aᵀ·Bᵀ, a LoRA with lora_A = A·W on a bias-free layer."""
    one = perturbed(one_linear("lorma", bias=False, rank=4))
    lora = one_linear("lora", bias=False, rank=4, alpha=16.0)
    t, W = one.tensors(), one.layer.weight.detach()
    with torch.no_grad():
        params = lora.adapted.named_adapter_parameters()
        params["adapters.0.lora_A"].copy_(t["lorma_A"] @ W)
        params["adapters.0.lora_B"].copy_(t["lorma_B"])
    assert (one.out() - one.base_out()).abs().max() > 1e-3
    torch.testing.assert_close(lora.out(one.x), one.out(), atol=TOL, rtol=TOL)


def test_refusals():
    with pytest.raises(
        ValueError, match=r"rank_inflation must be one of .*'none'.*not implemented"
    ):
        one_linear("lorma", rank=4, rank_inflation="none")
    with pytest.raises(ValueError, match=r"side .* must be one of \('pre', 'post'\), got 'both'"):
        one_linear("lorma", rank=4, side="both")
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3))
    spec = {"adapters": [{"method": "lorma", "targets": ["0"], "rank": 2}]}
    with pytest.raises(Exception, match=r"lorma supports linear layers only, not conv2d"):
        peftc.compile(model, spec, (torch.randn(2, 3, 8, 8),))
