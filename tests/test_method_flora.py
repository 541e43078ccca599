"""FLoRA (Tucker) against the reference formula on linear, GPT-2 Conv1D (addmm) and conv2d
sites, fp32, 1e-5: ΔW = scale·P_out·Gᵀ·P_inᵀ, and for conv2d the 4-way Tucker product applied
with the base's stride, padding, dilation and groups. The method-generic checks (merge,
gradients, checkpoints, bf16, ONNX, counts) are tests/test_methods.py's and its siblings'."""

import pytest
import torch
import torch.nn.functional as F
from transformers.pytorch_utils import Conv1D

import peftc
from cost_model.costs import method_cost
from rewrite.spec import SpecError
from tests.oracle import TOL, OneLayer, one_conv2d, one_linear, perturbed


def tucker4(t: dict[str, torch.Tensor]) -> torch.Tensor:
    """ΔW[o, i, h, w] = Σ G[a, b, c, d]·P_in[i, a]·P_out[o, b]·P_kh[h, c]·P_kw[w, d], as the
    official code's chain of mode products (tensordot over each rank in turn)."""
    d = torch.tensordot(t["flora_G"], t["flora_in"], dims=([0], [1]))  # b c d i
    d = torch.tensordot(d, t["flora_out"], dims=([0], [1]))  # c d i o
    d = torch.tensordot(d, t["flora_kh"], dims=([0], [1]))  # d i o h
    d = torch.tensordot(d, t["flora_kw"], dims=([0], [1]))  # i o h w
    return d.transpose(0, 1)


def merged_weight(one: OneLayer) -> torch.Tensor:
    return one.adapted.merge().get_submodule("0").weight.detach()


def test_linear_init_forward_and_merge_equal_the_formula():
    one = one_linear("flora", rank=4, scale=1.5)
    t = one.tensors()
    assert torch.equal(t["flora_G"], torch.zeros(4, 4))  # the identity at init
    assert t["flora_in"].shape == (24, 4) and t["flora_out"].shape == (16, 4)
    # Kaiming-normal, a = √3, fan-in = the rank: std √(2/(1+3))/√4 ≈ 0.354
    assert 0.25 < torch.cat([t["flora_in"], t["flora_out"]]).std() < 0.46
    torch.testing.assert_close(one.out(), one.base_out(), atol=TOL, rtol=TOL)

    t = perturbed(one).tensors()
    W, b = one.layer.weight.detach(), one.layer.bias.detach()
    delta = 1.5 * t["flora_out"] @ t["flora_G"].T @ t["flora_in"].T
    expected = one.x @ (W + delta).T + b
    assert (expected - one.base_out()).abs().max() > 1e-3
    torch.testing.assert_close(one.out(), expected, atol=TOL, rtol=TOL)
    torch.testing.assert_close(merged_weight(one), W + delta, atol=TOL, rtol=TOL)


def test_addmm_site_uses_the_logical_weight():
    """GPT-2's Conv1D stores W as [in, out]; the update is the same [out, in] ΔW."""
    torch.manual_seed(0)
    layer = Conv1D(16, 24)
    spec = {"adapters": [{"method": "flora", "targets": ["0"], "rank": 4}]}
    adapted = peftc.compile(torch.nn.Sequential(layer), spec, (torch.randn(2, 5, 24),)).eval()
    x = torch.randn(3, 7, 24)
    one = perturbed(OneLayer(layer, adapted, x))
    t = one.tensors()
    W = layer.weight.detach().T  # logical [out, in]
    expected = x @ (W + t["flora_out"] @ t["flora_G"].T @ t["flora_in"].T).T + layer.bias
    assert (expected - one.base_out()).abs().max() > 1e-3
    torch.testing.assert_close(one.out(), expected, atol=TOL, rtol=TOL)


def test_conv2d_forward_and_merge_equal_the_formula():
    """rank 4 on a 3×3 kernel: r_in = r_out = 4, r_kh = r_kw = min(4, 3) = 3."""
    one = one_conv2d("flora", rank=4, scale=0.5)
    x = torch.randn(3, 6, 9, 9, generator=torch.Generator().manual_seed(1))  # the traced H, W
    t = one.tensors()
    shapes = {k: tuple(v.shape) for k, v in t.items()}
    assert shapes == {
        "flora_G": (4, 4, 3, 3),
        "flora_in": (6, 4),
        "flora_out": (8, 4),
        "flora_kh": (3, 3),
        "flora_kw": (3, 3),
    }
    assert not t["flora_G"].any()
    torch.testing.assert_close(one.out(x), one.base_out(x), atol=TOL, rtol=TOL)

    t = perturbed(one).tensors()
    W, b = one.layer.weight.detach(), one.layer.bias.detach()
    merged = W + 0.5 * tucker4(t)
    expected = F.conv2d(x, merged, b, padding=1)
    assert (expected - one.base_out(x)).abs().max() > 1e-3
    torch.testing.assert_close(one.out(x), expected, atol=TOL, rtol=TOL)
    torch.testing.assert_close(merged_weight(one), merged, atol=TOL, rtol=TOL)


def test_conv2d_applies_the_base_geometry():
    """A grouped, strided, dilated 3×1 conv: the in factor spans in/groups channels, the kw
    factor is 1×1 (min(rank, 1)), and the merged conv keeps groups=2."""
    torch.manual_seed(0)
    layer = torch.nn.Conv2d(4, 6, (3, 1), stride=2, padding=2, dilation=2, groups=2)
    spec = {"adapters": [{"method": "flora", "targets": ["0"], "rank": 2}]}
    adapted = peftc.compile(torch.nn.Sequential(layer), spec, (torch.randn(2, 4, 9, 9),)).eval()
    x = torch.randn(3, 4, 9, 9)
    one = perturbed(OneLayer(layer, adapted, x))
    t = one.tensors()
    assert t["flora_in"].shape == (2, 2) and t["flora_kw"].shape == (1, 1)
    assert t["flora_G"].shape == (2, 2, 2, 1)
    merged = layer.weight.detach() + tucker4(t)
    expected = F.conv2d(x, merged, layer.bias, stride=2, padding=2, dilation=2, groups=2)
    assert (expected - one.base_out()).abs().max() > 1e-3
    torch.testing.assert_close(one.out(), expected, atol=TOL, rtol=TOL)
    a = adapted.plan.assignments[0]  # the conv cost formula counts the built tensors
    assert method_cost(a.method, a.site).evaluate()["params"] == sum(v.numel() for v in t.values())
    graph = adapted.merge()
    assert graph.get_submodule("0").weight.shape == (6, 2, 3, 1)
    with torch.no_grad():
        torch.testing.assert_close(graph(x), expected, atol=TOL, rtol=TOL)


def test_linear_flora_is_a_lora_with_the_core_folded_in():
    """The 2-D case is LoRA's update with lora_A = Gᵀ·P_inᵀ (r×in) and lora_B = P_out
    (out×r), at the same scale (lora: alpha/r = 6/4 = 1.5)."""
    one = perturbed(one_linear("flora", rank=4, scale=1.5))
    t = one.tensors()
    lora = one_linear("lora", rank=4, alpha=6.0)
    with torch.no_grad():
        params = lora.adapted.named_adapter_parameters()
        params["adapters.0.lora_A"].copy_(t["flora_G"].T @ t["flora_in"].T)
        params["adapters.0.lora_B"].copy_(t["flora_out"])
    assert (one.out() - one.base_out()).abs().max() > 1e-3
    torch.testing.assert_close(lora.out(one.x), one.out(), atol=TOL, rtol=TOL)


def test_refusals_name_the_reason():
    with pytest.raises(SpecError, match=r"in_channels/groups=3.*lower the rank"):
        torch.manual_seed(0)
        conv = torch.nn.Sequential(torch.nn.Conv2d(6, 8, 3, groups=2))
        spec = {"adapters": [{"method": "flora", "targets": ["0"], "rank": 4}]}
        peftc.compile(conv, spec, (torch.randn(2, 6, 5, 5),))
    with pytest.raises(SpecError, match="flora supports linear, conv2d layers only"):
        emb = torch.nn.Sequential(torch.nn.Embedding(10, 8))
        spec = {"adapters": [{"method": "flora", "targets": ["0"], "rank": 2}]}
        peftc.compile(emb, spec, (torch.tensor([[1, 2], [3, 4]]),))
    with pytest.raises(SpecError, match="flora: scale must be a positive number"):
        one_linear("flora", rank=4, scale=0)
