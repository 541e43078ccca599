"""NOLA against the reference formula (fp32, 1e-5): A and B as combinations of frozen random
bases, the merged weight, LoRA with the same A and B, the bases regenerated from basis_seed and
the site path (so a checkpoint holds the coefficients only), and the refusals. The
method-generic checks are tests/test_methods.py's and its siblings'."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file

import peftc
from passes.merge import merged_weights
from rewrite.spec import SpecError
from tests.oracle import TOL, one_linear, perturbed

K = 16  # bases per factor


def factors(t: dict, k: int = K) -> tuple[torch.Tensor, torch.Tensor]:
    """A = A₀ + Σᵢ αᵢ·Âᵢ/√k, B = Σⱼ βⱼ·B̂ⱼ/√k."""
    A = t["nola_A0"] + sum(t["nola_alpha"][i] * t["nola_basis_A"][i] for i in range(k)) / math.sqrt(
        k
    )
    B = sum(t["nola_beta"][j] * t["nola_basis_B"][j] for j in range(k)) / math.sqrt(k)
    return A, B


def test_forward_and_merge_equal_the_reference_formula():
    one = perturbed(one_linear("nola", rank=4, alpha=6.0, num_basis=K))  # s = 6/4
    t, W, b = one.tensors(), one.layer.weight.detach(), one.layer.bias.detach()
    A, B = factors(t)
    expected = one.x @ W.T + b + 1.5 * one.x @ (B @ A).T
    assert (expected - one.base_out()).abs().max() > 1e-3
    torch.testing.assert_close(one.out(), expected, atol=TOL, rtol=TOL)
    merged = merged_weights(one.adapted.plan.assignments, one.adapted.state())["0"]
    torch.testing.assert_close(merged, W + 1.5 * B @ A, atol=TOL, rtol=TOL)


def test_init_coefficients_zero_bases_uniform_a0_kaiming():
    one = one_linear("nola", rank=4, num_basis=K)
    t = one.tensors()
    params = one.adapted.named_adapter_parameters()
    trainable = sorted(k.rsplit(".", 1)[-1] for k, v in params.items() if v.requires_grad)
    assert trainable == ["nola_alpha", "nola_beta"]
    assert not t["nola_alpha"].any() and not t["nola_beta"].any()
    for basis in (t["nola_basis_A"], t["nola_basis_B"]):
        assert basis.abs().max() <= 1.0 and basis.abs().max() > 0.9  # uniform(-1, 1)
        assert 0.45 < basis.abs().mean() < 0.55
    bound = 1 / math.sqrt(24)  # Kaiming-uniform with a = √5: U(-1/√in, 1/√in)
    assert t["nola_A0"].abs().max() <= bound and t["nola_A0"].abs().max() > 0.8 * bound
    assert t["nola_basis_A"].shape == (K, 4, 24) and t["nola_basis_B"].shape == (K, 16, 4)


def test_equals_lora_with_the_same_factors():
    one = perturbed(one_linear("nola", rank=4, num_basis=K))  # alpha = rank: s = 1
    A, B = factors(one.tensors())
    lora = one_linear("lora", rank=4, alpha=4.0)
    with torch.no_grad():
        params = lora.adapted.named_adapter_parameters()
        params["adapters.0.lora_A"].copy_(A)
        params["adapters.0.lora_B"].copy_(B)
    assert (one.out() - one.base_out()).abs().max() > 1e-3
    torch.testing.assert_close(lora.out(one.x), one.out(), atol=TOL, rtol=TOL)


def _two_sites(basis_seed: int = 0, seed: int = 0) -> peftc.AdaptedModel:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(24, 24), torch.nn.Linear(24, 24))
    rule = {"method": "nola", "targets": ["0", "1"], "rank": 4, "num_basis": K}
    spec = {"adapters": [{**rule, "basis_seed": basis_seed}], "seed": seed}
    return peftc.compile(model, spec, (torch.randn(2, 3, 24),)).eval()


def _frozen(adapted, site: str) -> dict:
    return {
        k.rsplit(".", 1)[-1]: v.detach()
        for k, v in adapted.named_adapter_parameters().items()
        if k.startswith(f"adapters.{site}.") and not v.requires_grad
    }


def test_bases_come_from_basis_seed_and_the_site_path_only():
    first, again = _two_sites(), _two_sites(seed=5)  # another compile seed: the same bases
    for site in ("0", "1"):
        for name, value in _frozen(first, site).items():
            assert torch.equal(value, _frozen(again, site)[name]), name
    other_site = _frozen(first, "1")
    other_seed = _frozen(_two_sites(basis_seed=1), "0")
    for name, value in _frozen(first, "0").items():
        assert not torch.equal(value, other_site[name]), name
        assert not torch.equal(value, other_seed[name]), name


def test_checkpoint_holds_the_coefficients_and_a_fresh_model_regenerates_the_bases(tmp_path):
    adapted = _two_sites(basis_seed=3)
    perturb = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in adapted.trainable_parameters():
            p.add_(torch.randn(p.shape, generator=perturb) * 0.1)
    adapted.save_adapter(tmp_path)
    keys = sorted(
        k.rsplit(".", 1)[-1] for k in load_file(str(tmp_path / "adapter_model.safetensors"))
    )
    assert keys == ["nola_alpha", "nola_alpha", "nola_beta", "nola_beta"]
    assert json.loads((tmp_path / "adapter_config.json").read_text())["basis_seed"] == 3
    x = torch.randn(3, 5, 24)
    fresh = _two_sites(basis_seed=3, seed=9)
    with torch.no_grad():
        assert (fresh(x) - adapted(x)).abs().max() > 1e-3
        fresh.load_adapter(tmp_path)
        torch.testing.assert_close(fresh(x), adapted(x), atol=0, rtol=0)


def test_rank_above_the_layer_is_refused():
    with pytest.raises(SpecError, match=r"rank 20 is larger than the layer allows.*lower the rank"):
        one_linear("nola", rank=20, num_basis=K)


def test_conv2d_is_refused():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(4, 6, 3))
    spec = {"adapters": [{"method": "nola", "targets": ["0"], "rank": 2}]}
    with pytest.raises(SpecError, match="nola supports linear layers only, not conv2d sites"):
        peftc.compile(model, spec, (torch.randn(2, 4, 8, 8),))


def test_num_basis_must_be_positive():
    with pytest.raises(SpecError, match=r"nola: num_basis \(the number of random bases.*got 0"):
        one_linear("nola", rank=4, num_basis=0)
