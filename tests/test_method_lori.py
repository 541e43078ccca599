"""LoRI-D and LoRI-S against the reference formulas (fp32, 1e-5), the mask extraction (a
global top-k over |B| of all adapted layers), LoRA with the same A and B, and the refusals.
The method-generic checks are tests/test_methods.py's and its siblings'."""

import math

import pytest
import torch
from safetensors.torch import load_file

import peftc
from passes.adapters.lori import extract_lori_mask
from passes.merge import merged_weights
from rewrite.spec import SpecError
from tests.oracle import TOL, one_conv2d, one_linear, perturbed


def test_lori_d_init_forward_and_merge_equal_the_reference():
    one = one_linear("lori", rank=4)
    params = one.adapted.named_adapter_parameters()
    assert not params["adapters.0.lori_A"].requires_grad  # A frozen, B trains
    assert params["adapters.0.lori_B"].requires_grad and not params["adapters.0.lori_B"].any()
    assert params["adapters.0.lori_A"].abs().max() <= 1 / math.sqrt(24)  # Kaiming, a = √5
    perturbed(one)
    t, W, b = one.tensors(), one.layer.weight.detach(), one.layer.bias.detach()
    delta = (2 * 4 / 4) * t["lori_B"] @ t["lori_A"]  # s = alpha / r, alpha = 2·rank
    expected = one.x @ (W + delta).T + b
    assert (expected - one.base_out()).abs().max() > 1e-3
    torch.testing.assert_close(one.out(), expected, atol=TOL, rtol=TOL)
    merged = merged_weights(one.adapted.plan.assignments, one.adapted.state())["0"]
    torch.testing.assert_close(merged, W + delta, atol=TOL, rtol=TOL)


def test_lori_d_equals_lora_with_the_same_factors():
    one = perturbed(one_linear("lori", rank=4, alpha=6.0))
    t = one.tensors()
    lora = one_linear("lora", rank=4, alpha=6.0)
    with torch.no_grad():
        params = lora.adapted.named_adapter_parameters()
        params["adapters.0.lora_A"].copy_(t["lori_A"])
        params["adapters.0.lora_B"].copy_(t["lori_B"])
    assert (one.out() - one.base_out()).abs().max() > 1e-3
    torch.testing.assert_close(lora.out(one.x), one.out(), atol=TOL, rtol=TOL)


def two_layers(**hyper):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(24, 16), torch.nn.Linear(16, 12))
    spec = {"adapters": [{"method": "lori", "targets": ["0", "1"], "rank": 4, **hyper}]}
    return model, peftc.compile(model, spec, (torch.randn(2, 5, 24),))


def test_extracted_mask_is_a_global_top_k_over_all_layers(tmp_path):
    """Layer 0's B is 10x larger: a global top-k keeps mostly its entries (a per-layer one
    would keep 10% of each)."""
    _, lori_d = two_layers()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        params = lori_d.named_adapter_parameters()
        params["adapters.0.lori_B"].copy_(torch.randn(16, 4, generator=g) * 10)
        params["adapters.1.lori_B"].copy_(torch.randn(12, 4, generator=g))
    masks = extract_lori_mask(lori_d, sparsity=0.9, path=tmp_path / "mask.safetensors")
    scores = torch.cat([params[f"adapters.{k}.lori_B"].detach().abs().flatten() for k in "01"])
    keep = round(scores.numel() * 0.1)  # 112 entries, keep 11
    threshold = scores.sort(descending=True).values[keep - 1]
    for k in "01":
        expected = params[f"adapters.{k}.lori_B"].detach().abs() >= threshold
        assert torch.equal(masks[k], expected), k
    assert sum(int(m.sum()) for m in masks.values()) == keep
    assert int(masks["0"].sum()) > 0.1 * 64  # global, not per layer
    saved = load_file(tmp_path / "mask.safetensors")
    assert saved.keys() == masks.keys() and all(torch.equal(saved[k], masks[k]) for k in saved)
    # the adapter's own sparsity is the default
    assert sum(int(m.sum()) for m in extract_lori_mask(lori_d).values()) == keep


def test_lori_s_masks_b_in_forward_gradient_and_merge(tmp_path):
    model_d, lori_d = two_layers()
    with torch.no_grad():
        for p in lori_d.trainable_parameters():
            p.normal_(generator=torch.Generator().manual_seed(5))
    path = str(tmp_path / "mask.safetensors")
    masks = extract_lori_mask(lori_d, sparsity=0.75, path=path)
    model_s, lori_s = two_layers(mask=path)
    d, s = lori_d.named_adapter_parameters(), lori_s.named_adapter_parameters()
    assert torch.equal(s["adapters.0.lori_A"], d["adapters.0.lori_A"])  # same seed, same A
    assert torch.equal(s["adapters.1.lori_mask"], masks["1"].float())
    assert not s["adapters.1.lori_mask"].requires_grad
    with torch.no_grad():
        for p in lori_s.trainable_parameters():
            p.normal_(generator=torch.Generator().manual_seed(6))
    x = torch.randn(3, 7, 24, generator=torch.Generator().manual_seed(1))
    h = x
    merged_expected = {}
    for k in "01":
        layer = model_s.get_submodule(k)
        A, B, M = (s[f"adapters.{k}.lori_{n}"].detach() for n in ("A", "B", "mask"))
        merged_expected[k] = layer.weight.detach() + 2.0 * (B * M) @ A
        h = h @ merged_expected[k].T + layer.bias.detach()
    with torch.no_grad():
        got = lori_s(x)
        assert (got - model_s(x)).abs().max() > 1e-3
    torch.testing.assert_close(got, h, atol=TOL, rtol=TOL)
    merged = merged_weights(lori_s.plan.assignments, lori_s.state())
    for k in "01":
        torch.testing.assert_close(merged[k], merged_expected[k], atol=TOL, rtol=TOL)
    lori_s.train()
    lori_s(x).sum().backward()
    grad = s["adapters.0.lori_B"].grad
    assert grad[masks["0"]].abs().min() > 0 and not grad[~masks["0"]].any()


def test_refusals(tmp_path):
    with pytest.raises(SpecError, match="lori supports linear layers only, not conv2d"):
        one_conv2d("lori")
    with pytest.raises(ValueError, match="mask file .* not found; extract one"):
        one_linear("lori", mask=str(tmp_path / "missing.safetensors"))
    _, lori_d = two_layers()
    path = str(tmp_path / "mask.safetensors")
    extract_lori_mask(lori_d, sparsity=0.5, path=path)
    with pytest.raises(ValueError, match=r"has shape \(16, 4\), but rank 2 needs"):
        two_layers(mask=path, rank=2)
    with pytest.raises(SpecError, match=r"sparsity .* must be in \[0, 1\), got 1.0"):
        one_linear("lori", sparsity=1.0)
    with pytest.raises(ValueError, match="no lori_B tensors found"):
        extract_lori_mask({"adapters.0.lora_B": torch.ones(2, 2)})
