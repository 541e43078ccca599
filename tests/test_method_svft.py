"""SVFT against the reference formula W' = U·(Σ + σ(g)·M)·Vᵀ for each pattern (banded, random,
top_k) and layer kind (linear, GPT-2's addmm), its init, the official top_k rule, the random
pattern's positions regenerated from the seed at load, and its refusals (fp32, 1e-5). The
method-generic checks are tests/test_methods.py's and its siblings'."""

import pytest
import torch
from safetensors.torch import load_file

import peftc
from rewrite.spec import SpecError
from tests.oracle import TOL, OneLayer, one_conv1d, one_linear, perturbed


def dense_M(t: dict, n: int) -> torch.Tensor:
    """M n×n from the (row, col) positions; repeated positions add up."""
    M = torch.zeros(n, n)
    for (i, j), v in zip(t["svft_indices"].T.tolist(), t["svft_values"].tolist(), strict=True):
        M[i, j] += v
    return M


def reference_weight(W: torch.Tensor, t: dict) -> torch.Tensor:
    """U·(Σ + σ(g)·M)·Vᵀ from the full SVD; with a rank r, W + σ(g)·U_r·M·V_rᵀ (peftc's
    choice: W's tail kept)."""
    U, V, n = t["svft_U"], t["svft_V"], t["svft_U"].shape[1]
    gated = torch.sigmoid(t["svft_gate"]) * dense_M(t, n)
    if n == min(W.shape):
        S = torch.linalg.svdvals(W)
        return U @ (torch.diag(S) + gated) @ V
    return W + U @ gated @ V


def check_forward_and_merge(one: OneLayer, W: torch.Tensor) -> None:
    t, b = one.tensors(), one.layer.bias.detach()
    W_new = reference_weight(W, t)
    expected = one.x @ W_new.T + b
    assert (expected - one.base_out()).abs().max() > 1e-3  # a visible update
    torch.testing.assert_close(one.out(), expected, atol=TOL, rtol=TOL)
    merged = one.merged_weight()
    torch.testing.assert_close(merged, W_new, atol=TOL, rtol=TOL)


def test_init_singular_vectors_kaiming_values_and_a_closed_gate():
    one = one_linear("svft", off_diag=3)  # n = 16, k = 16·7 − 12 = 100
    t, W = one.tensors(), one.layer.weight.detach()
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    torch.testing.assert_close(t["svft_U"] @ torch.diag(S) @ t["svft_V"], W, atol=TOL, rtol=TOL)
    torch.testing.assert_close(t["svft_U"].T @ t["svft_U"], torch.eye(16), atol=TOL, rtol=0)
    assert t["svft_gate"].tolist() == [0.0]  # σ(0) = 1/2: not the identity
    k = t["svft_values"].numel()
    assert k == 100 and 0.7 < t["svft_values"].std() / (2 / k) ** 0.5 < 1.3  # Kaiming, fan_in k
    band = {(i, j) for i in range(16) for j in range(16) if abs(i - j) <= 3}
    assert {tuple(p) for p in t["svft_indices"].T.tolist()} == band
    assert t["svft_indices"].dtype == torch.int64
    params = one.adapted.named_adapter_parameters()
    trainable = {k.rsplit(".", 1)[-1] for k, p in params.items() if p.requires_grad}
    assert trainable == {"svft_values", "svft_gate"}
    assert (one.out() - one.base_out()).abs().max() > 1e-3  # moves at init


@pytest.mark.parametrize(
    "hyper",
    [
        {"pattern": "banded"},  # SVFT-plain: the diagonal
        {"pattern": "banded", "off_diag": 2},
        {"pattern": "random", "off_diag": 2},
        {"pattern": "top_k", "off_diag": 1},
        {"pattern": "banded", "off_diag": 1, "rank": 6},  # W's tail kept
    ],
    ids=lambda h: "-".join(f"{k}{v}" for k, v in h.items()),
)
def test_forward_and_merge_equal_the_reference_formula(hyper):
    one = perturbed(one_linear("svft", **hyper))
    check_forward_and_merge(one, one.layer.weight.detach())


def test_addmm_site_equals_the_reference_formula():
    one = perturbed(one_conv1d("svft", off_diag=1))
    check_forward_and_merge(one, one.layer.weight.detach().T)


@pytest.mark.parametrize("shape", [(24, 16), (16, 16), (16, 24)], ids=str)
def test_top_k_positions_follow_the_official_rule(shape):
    """The k largest entries of U·V for a square W, else of whichever of U (out ≤ in) and Vᵀ
    (in < out) is square (VijayLingam95/SVFT, SVFTLayer)."""
    i, o = shape
    t = one_linear("svft", in_features=i, out_features=o, pattern="top_k", off_diag=1).tensors()
    U, Vh = t["svft_U"], t["svft_V"]
    coeffs = U @ Vh.T if i == o else (U if o < i else Vh)
    n = min(i, o)
    k = n * 3 - 2
    flat = torch.topk(coeffs.reshape(-1), k).indices
    assert t["svft_indices"].tolist() == [(flat // n).tolist(), (flat % n).tolist()]


def test_random_positions_are_regenerated_from_the_seed(tmp_path):
    """Not saved: a fresh compile with the same seed draws the same positions and loads the
    checkpoint to the same outputs; another seed draws others."""
    one = perturbed(one_linear("svft", pattern="random", off_diag=2, seed=3))
    one.adapted.save_adapter(tmp_path)
    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert not [k for k in saved if "indices" in k or "svft_U" in k]
    again = one_linear("svft", pattern="random", off_diag=2, seed=3)
    assert torch.equal(again.tensors()["svft_indices"], one.tensors()["svft_indices"])
    again.adapted.load_adapter(tmp_path)
    assert (again.out(one.x) - one.base_out()).abs().max() > 1e-3
    torch.testing.assert_close(again.out(one.x), one.out(), atol=0, rtol=0)
    other = one_linear("svft", pattern="random", off_diag=2, seed=4).tensors()
    assert not torch.equal(other["svft_indices"], one.tensors()["svft_indices"])


def test_refusals_name_the_reason():
    with pytest.raises(SpecError, match=r"rank 20 is larger than the layer's number of singular"):
        one_linear("svft", rank=20)
    with pytest.raises(SpecError, match=r"off_diag 16 needs an n×n M with n > 16, but n is 16"):
        one_linear("svft", off_diag=16)
    with pytest.raises(SpecError, match=r"svft: pattern \(where M's entries sit\) must be one of"):
        one_linear("svft", pattern="diagonal")
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3))
    spec = {"adapters": [{"method": "svft", "targets": ["0"]}]}
    with pytest.raises(SpecError, match=r"svft supports linear layers only, not conv2d"):
        peftc.compile(model, spec, (torch.randn(2, 3, 8, 8),))
