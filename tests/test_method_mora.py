"""MoRA against the reference formulas (types 1 and 6, fp32, 1e-5), its merge (including
in ≤ r̂, where the reference's type-6 merge crashes), MiSS where the maths coincides, and its
refusals. The method-generic checks are tests/test_methods.py's and its siblings'."""

import math

import pytest
import torch

from passes.merge import merged_weights
from rewrite.spec import SpecError
from tests.oracle import TOL, one_conv2d, one_linear, perturbed


def r_hat(i: int, o: int, r: int, mora_type: int) -> int:
    n = int(math.sqrt((i + o) * r) + 0.5)
    return n // 2 * 2 if mora_type == 6 else n


def delta_type1(M: torch.Tensor, i: int, o: int) -> torch.Tensor:
    """ΔW[o', j] = Σ over k < in + pad with k mod in = j of M[o' mod r̂, k mod r̂]."""
    r = M.shape[0]
    pad = (r - i % r) % r
    dw = torch.zeros(o, i)
    for row in range(o):
        for k in range(i + pad):
            dw[row, k % i] += M[row % r, k % r]
    return dw


def reference_type6(x: torch.Tensor, M: torch.Tensor, o: int) -> torch.Tensor:
    """Wrap-pad x, rotate block b by RoPE at position b (half-split), M on each block,
    concatenate, then cut or tile to out."""
    r, i = M.shape[0], x.shape[-1]
    blocks = math.ceil(i / r)
    x_pad = x[..., torch.arange(blocks * r) % i]
    outs = []
    for b in range(blocks):
        xb = x_pad[..., b * r : (b + 1) * r]
        inv_freq = 1.0 / 10000 ** (torch.arange(0, r, 2).float() / r)
        angle = torch.cat([b * inv_freq, b * inv_freq])
        half = torch.cat([-xb[..., r // 2 :], xb[..., : r // 2]], dim=-1)
        outs.append((xb * angle.cos() + half * angle.sin()) @ M.T)
    y = torch.cat(outs, dim=-1)
    return y[..., torch.arange(o) % y.shape[-1]]


def test_type1_forward_init_and_merge_equal_the_reference():
    one = one_linear("mora", rank=4)  # in 24, out 16: r̂ = int(√160 + .5) = 13, pad 2
    M0 = one.tensors()["mora_M"]
    assert M0.shape == (13, 13) and not M0.any()  # zero-initialised: the identity
    perturbed(one)
    t, W, b = one.tensors(), one.layer.weight.detach(), one.layer.bias.detach()
    dw = delta_type1(t["mora_M"], 24, 16)
    expected = one.x @ (W + dw).T + b
    assert (expected - one.base_out()).abs().max() > 1e-3
    torch.testing.assert_close(one.out(), expected, atol=TOL, rtol=TOL)
    merged = merged_weights(one.adapted.plan.assignments, one.adapted.state())["0"]
    torch.testing.assert_close(merged, W + dw, atol=TOL, rtol=TOL)


def test_type6_forward_and_merge_equal_the_reference():
    """in 20, out 40: r̂ = 15 rounded down to 14, two blocks (the second wraps onto columns
    0..7), 28 outputs tiled to 40."""
    one = perturbed(one_linear("mora", in_features=20, out_features=40, rank=4, mora_type=6))
    t, W, b = one.tensors(), one.layer.weight.detach(), one.layer.bias.detach()
    assert t["mora_M"].shape == (14, 14) and r_hat(20, 40, 4, 6) == 14
    expected = one.x @ W.T + b + reference_type6(one.x, t["mora_M"], 40)
    assert (expected - one.base_out()).abs().max() > 1e-3
    torch.testing.assert_close(one.out(), expected, atol=TOL, rtol=TOL)
    dw = reference_type6(torch.eye(20), t["mora_M"], 40).T
    merged = merged_weights(one.adapted.plan.assignments, one.adapted.state())["0"]
    torch.testing.assert_close(merged, W + dw, atol=TOL, rtol=TOL)


@pytest.mark.parametrize("mora_type", [1, 6])
def test_merge_when_in_features_is_at_most_r_hat(mora_type):
    """in 6, out 40, rank 8: r̂ = 19 (18 for type 6) > in, so the pad (12 or 13) is longer than
    x itself and wraps around it twice; the merged model equals the adapted one."""
    one = perturbed(one_linear("mora", in_features=6, out_features=40, rank=8, mora_type=mora_type))
    t, W, b = one.tensors(), one.layer.weight.detach(), one.layer.bias.detach()
    n = r_hat(6, 40, 8, mora_type)
    assert t["mora_M"].shape == (n, n) and n > 6
    if mora_type == 1:
        expected = one.x @ (W + delta_type1(t["mora_M"], 6, 40)).T + b
    else:
        expected = one.x @ W.T + b + reference_type6(one.x, t["mora_M"], 40)
    torch.testing.assert_close(one.out(), expected, atol=TOL, rtol=TOL)
    merged = one.adapted.merge()
    with torch.no_grad():
        torch.testing.assert_close(merged(one.x), expected, atol=TOL, rtol=TOL)


def test_type1_equals_miss_mini_form_without_padding():
    """in 24, out 24, rank 3: r̂ = 12 divides in (no pad) and out; the block sum is MiSS's shard
    sum and tiling M's outputs is MiSS's mini form, with miss_block = Mᵀ and mini_r = r̂."""
    one = perturbed(one_linear("mora", in_features=24, out_features=24, rank=3))
    M = one.tensors()["mora_M"]
    assert M.shape == (12, 12)
    miss = one_linear("miss", in_features=24, out_features=24, rank=12, mini_r=12)
    with torch.no_grad():
        miss.adapted.named_adapter_parameters()["adapters.0.miss_block"].copy_(M.T)
    assert (one.out() - one.base_out()).abs().max() > 1e-3
    torch.testing.assert_close(miss.out(one.x), one.out(), atol=TOL, rtol=TOL)


def test_refusals():
    with pytest.raises(SpecError, match="mora supports linear layers only, not conv2d"):
        one_conv2d("mora")
    with pytest.raises(SpecError, match=r"mora_type .* must be one of \(1, 6\), got 3"):
        one_linear("mora", mora_type=3)
    with pytest.raises(SpecError, match="type 6 needs an even block size.*use mora_type 1"):
        one_linear("mora", in_features=1, out_features=1, rank=1, mora_type=6)
