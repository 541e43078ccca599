"""Hydra against the paper's formula (fp32, 1e-5): y = h + B_p·A_p·x + B_s·A_s·h with
h = x·Wᵀ + b, on linear and GPT-2 Conv1D (addmm) sites; its init, merged weight and merged
bias, and LoRA as its parallel branch alone. The method-generic checks are
tests/test_methods.py's and its siblings'."""

import math

import pytest
import torch
from transformers.pytorch_utils import Conv1D

import peftc
from tests.oracle import TOL, OneLayer, one_linear, perturbed


def _expected(x, W, b, t):
    h = x @ W.T + (0 if b is None else b)
    par = x @ (t["hydra_par_B"] @ t["hydra_par_A"]).T
    return h + par + h @ (t["hydra_seq_B"] @ t["hydra_seq_A"]).T


def test_forward_equals_the_paper_formula():
    one = perturbed(one_linear("hydra", rank=4, seq_rank=3))
    t, W, b = one.tensors(), one.layer.weight.detach(), one.layer.bias.detach()
    assert t["hydra_par_A"].shape == (4, 24) and t["hydra_par_B"].shape == (16, 4)
    assert t["hydra_seq_A"].shape == (3, 16) and t["hydra_seq_B"].shape == (16, 3)
    expected = _expected(one.x, W, b, t)
    assert (expected - one.base_out()).abs().max() > 1e-3
    torch.testing.assert_close(one.out(), expected, atol=TOL, rtol=TOL)


def test_init_is_kaiming_a_and_zero_b():
    one = one_linear("hydra", rank=4)
    t = one.tensors()
    assert t["hydra_seq_A"].shape == (4, 16)  # seq_rank defaults to rank
    for branch, fan_in in (("par", 24), ("seq", 16)):
        A, bound = t[f"hydra_{branch}_A"], 1 / math.sqrt(fan_in)  # Kaiming a = √5
        assert A.abs().max() <= bound and A.std() > bound / 4
        assert not t[f"hydra_{branch}_B"].any()
    torch.testing.assert_close(one.out(), one.base_out(), atol=0, rtol=0)


def test_merge_on_a_bias_free_layer():
    """W' = W + B_p·A_p + B_s·A_s·W, and the merged model equals the unmerged one."""
    one = perturbed(one_linear("hydra", bias=False, rank=4))
    t, W = one.tensors(), one.layer.weight.detach()
    a = one.adapted.plan.assignments[0]
    expected = W + t["hydra_par_B"] @ t["hydra_par_A"] + t["hydra_seq_B"] @ t["hydra_seq_A"] @ W
    torch.testing.assert_close(a.method.merged_weight(a.site, W, t), expected, atol=TOL, rtol=TOL)
    unmerged = one.out()
    torch.testing.assert_close(unmerged, _expected(one.x, W, None, t), atol=TOL, rtol=TOL)
    assert (unmerged - one.base_out()).abs().max() > 1e-3
    with torch.no_grad():
        merged = one.adapted.merge()(one.x)
    torch.testing.assert_close(merged, unmerged, atol=TOL, rtol=TOL)


def test_merge_folds_the_bias_change():
    """The sequential branch changes the bias, b' = b + B_s·A_s·b: merged == unmerged on a
    biased layer, and the merged bias is the formula's."""
    one = perturbed(one_linear("hydra", rank=4))
    t, W, b = one.tensors(), one.layer.weight.detach(), one.layer.bias.detach()
    a = one.adapted.plan.assignments[0]
    expected_b = b + t["hydra_seq_B"] @ t["hydra_seq_A"] @ b
    got_b = a.method.merged_bias(a.site, W, b, t)
    torch.testing.assert_close(got_b, expected_b, atol=TOL, rtol=TOL)
    assert (got_b - b).abs().max() > 1e-3
    unmerged = one.out()
    with torch.no_grad():
        merged = one.adapted.merge()(one.x)
    torch.testing.assert_close(merged, unmerged, atol=TOL, rtol=TOL)


def test_addmm_sites():
    """GPT-2's Conv1D (W stored [in, out], a bias): the same formula on the logical W."""
    torch.manual_seed(0)
    layer = Conv1D(16, 24)
    with torch.no_grad():
        layer.bias.normal_()
    spec = {"adapters": [{"method": "hydra", "targets": ["0"], "rank": 4}]}
    adapted = peftc.compile(torch.nn.Sequential(layer), spec, (torch.randn(2, 5, 24),)).eval()
    x = torch.randn(3, 7, 24, generator=torch.Generator().manual_seed(1))
    one = perturbed(OneLayer(layer, adapted, x))
    t, W, b = one.tensors(), layer.weight.detach().T, layer.bias.detach()
    expected = _expected(x, W, b, t)
    assert (expected - one.base_out()).abs().max() > 1e-3
    torch.testing.assert_close(one.out(), expected, atol=TOL, rtol=TOL)
    with torch.no_grad():
        merged = adapted.merge()(x)
    torch.testing.assert_close(merged, expected, atol=TOL, rtol=TOL)


def test_parallel_branch_alone_is_lora():
    """With the sequential B zero, Hydra is a LoRA with s = 1 (alpha = rank)."""
    one = perturbed(one_linear("hydra", rank=4))
    lora = one_linear("lora", rank=4, alpha=4.0)
    with torch.no_grad():
        one.adapted.named_adapter_parameters()["adapters.0.hydra_seq_B"].zero_()
        t = one.tensors()
        params = lora.adapted.named_adapter_parameters()
        params["adapters.0.lora_A"].copy_(t["hydra_par_A"])
        params["adapters.0.lora_B"].copy_(t["hydra_par_B"])
    assert (one.out() - one.base_out()).abs().max() > 1e-3
    torch.testing.assert_close(lora.out(one.x), one.out(), atol=TOL, rtol=TOL)


def test_refusals():
    with pytest.raises(Exception, match=r"seq_rank 17 is larger than out_features 16"):
        one_linear("hydra", rank=4, seq_rank=17)
    with pytest.raises(Exception, match=r"rank 20 is larger than the layer allows"):
        one_linear("hydra", rank=20)
    with pytest.raises(ValueError, match=r"seq_rank .* must be null .* or a positive integer"):
        one_linear("hydra", rank=4, seq_rank=0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3))
    spec = {"adapters": [{"method": "hydra", "targets": ["0"], "rank": 2}]}
    with pytest.raises(Exception, match=r"hydra supports linear layers only, not conv2d"):
        peftc.compile(model, spec, (torch.randn(2, 3, 8, 8),))
