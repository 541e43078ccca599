"""LoLDU against the reference formula (fp32, 1e-5) on each layer kind it lists: linear,
conv2d (the weight viewed out×(in/groups·kh·kw)) and embedding; the LU init (P as an index
vector), the merged weight, and the refusals. The method-generic checks are
tests/test_methods.py's and its siblings'."""

import pytest
import torch
import torch.nn.functional as F

import peftc
from passes.merge import merged_weights
from rewrite.spec import SpecError
from tests.oracle import TOL, OneLayer, one_conv2d, one_linear, perturbed


def ldu(W2: torch.Tensor, r: int):
    """The reference's init of a 2-D weight: P, L_r, U_r (U/D) and z₀ = D[:r]."""
    P, L, U = torch.linalg.lu(W2)
    D = torch.diagonal(U)
    return P, L[:, :r], (U / D[:, None])[:r], D[:r]


def w_eff(W2: torch.Tensor, r: int, c: float, z: torch.Tensor) -> torch.Tensor:
    """W_res + c·P·L_r·diag(z)·U_r, with W_res = W − c·P·L_r·diag(z₀)·U_r."""
    P, L_r, U_r, z0 = ldu(W2, r)
    W_res = W2 - c * P @ L_r @ torch.diag(z0) @ U_r
    return W_res + c * P @ L_r @ torch.diag(z) @ U_r


def test_init_is_the_lu_of_w_with_p_as_an_index_vector():
    one = one_linear("loldu", rank=4)
    t, W = one.tensors(), one.layer.weight.detach()
    P, L_r, U_r, z0 = ldu(W, 4)
    perm = t["loldu_perm"]
    assert perm.dtype == torch.int64 and perm.shape == (16,)
    torch.testing.assert_close(F.one_hot(perm, 16).float(), P)  # P[i, perm[i]] = 1
    torch.testing.assert_close(t["loldu_L"], L_r, atol=TOL, rtol=TOL)
    torch.testing.assert_close(t["loldu_U"], U_r, atol=TOL, rtol=TOL)
    torch.testing.assert_close(t["loldu_z"], z0, atol=TOL, rtol=TOL)
    torch.testing.assert_close(t["loldu_z0"], z0, atol=0, rtol=0)
    trainable = [k for k, v in one.adapted.named_adapter_parameters().items() if v.requires_grad]
    assert [k.rsplit(".", 1)[-1] for k in trainable] == ["loldu_z"]


def test_linear_forward_and_merge_equal_the_reference_formula():
    one = perturbed(one_linear("loldu", rank=4, alpha=2.0))  # c = 1/2
    t, W, b = one.tensors(), one.layer.weight.detach(), one.layer.bias.detach()
    W_eff = w_eff(W, 4, 0.5, t["loldu_z"])
    expected = one.x @ W_eff.T + b
    assert (expected - one.base_out()).abs().max() > 1e-3
    torch.testing.assert_close(one.out(), expected, atol=TOL, rtol=TOL)
    merged = merged_weights(one.adapted.plan.assignments, one.adapted.state())["0"]
    torch.testing.assert_close(merged, W_eff, atol=TOL, rtol=TOL)


def grouped_conv(groups: int) -> OneLayer:
    """A strided conv with `groups`, adapted; x of the traced spatial size (9×9)."""
    torch.manual_seed(0)
    layer = torch.nn.Conv2d(6, 8, 3, padding=1, stride=2, groups=groups)
    spec = {"adapters": [{"method": "loldu", "targets": ["0"], "rank": 4, "alpha": 2.0}]}
    adapted = peftc.compile(torch.nn.Sequential(layer), spec, (torch.randn(2, 6, 9, 9),))
    return OneLayer(layer, adapted.eval(), torch.randn(3, 6, 9, 9))


@pytest.mark.parametrize("groups", [None, 1, 2])
def test_conv2d_views_the_weight_out_by_in_k(groups):
    """None: tests.oracle's conv (padding 1); 1 and 2: a strided conv, ungrouped and grouped
    (its weight [out, in/groups, kh, kw] is factored as out×(in/groups·kh·kw))."""
    one = perturbed(
        one_conv2d("loldu", rank=4, alpha=2.0) if groups is None else grouped_conv(groups)
    )
    x = torch.randn(3, 6, 9, 9, generator=torch.Generator().manual_seed(1))  # the traced 9×9
    layer, t = one.layer, one.tensors()
    W, b = layer.weight.detach(), layer.bias.detach()
    assert t["loldu_U"].shape == (4, W[0].numel())
    W_eff = w_eff(W.flatten(1), 4, 0.5, t["loldu_z"]).view(W.shape)
    expected = F.conv2d(x, W_eff, b, layer.stride, layer.padding, layer.dilation, layer.groups)
    assert (expected - one.base_out(x)).abs().max() > 1e-3
    out = one.out(x)
    torch.testing.assert_close(out, expected, atol=TOL, rtol=TOL)
    with torch.no_grad():
        torch.testing.assert_close(one.adapted.merge()(x), out, atol=TOL, rtol=TOL)


def test_embedding_factors_the_vocab_by_dim_weight():
    torch.manual_seed(0)
    layer = torch.nn.Embedding(20, 12)
    spec = {"adapters": [{"method": "loldu", "targets": ["0"], "rank": 4, "alpha": 2.0}]}
    ids = torch.randint(0, 20, (2, 5))
    adapted = peftc.compile(torch.nn.Sequential(layer), spec, (ids,)).eval()
    with torch.no_grad():
        z = adapted.named_adapter_parameters()["adapters.0.loldu_z"]
        z.add_(torch.randn(z.shape, generator=torch.Generator().manual_seed(2)) * 0.3)
    other = torch.randint(0, 20, (3, 7), generator=torch.Generator().manual_seed(1))
    W_eff = w_eff(layer.weight.detach(), 4, 0.5, z.detach())  # [vocab, dim]
    expected = F.embedding(other, W_eff)
    with torch.no_grad():
        out = adapted(other)
        assert (expected - layer(other)).abs().max() > 1e-3
        torch.testing.assert_close(out, expected, atol=TOL, rtol=TOL)
        torch.testing.assert_close(adapted.merge()(other), out, atol=TOL, rtol=TOL)


def test_rank_above_the_pivots_is_refused():
    with pytest.raises(SpecError, match=r"rank 20 is more than the 16 pivots.*lower the rank"):
        one_linear("loldu", rank=20)


def test_conv1d_is_refused():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv1d(4, 6, 3))
    spec = {"adapters": [{"method": "loldu", "targets": ["0"], "rank": 2}]}
    with pytest.raises(SpecError, match="loldu supports linear, conv2d, embedding layers only"):
        peftc.compile(model, spec, (torch.randn(2, 4, 8),))


def test_alpha_must_be_positive():
    with pytest.raises(SpecError, match="loldu: alpha .* must be a positive number, got 0"):
        one_linear("loldu", rank=4, alpha=0)
