"""EVA and CorDA (LoRA inits from calibration data) against PEFT (fp32, 1e-5).

The inits are compared with PEFT's on the same batches: both run the same algorithm on the
same site inputs in the same order (EVA: incremental PCA with a seeded randomized SVD; CorDA:
covariance, damping, SVD), so they agree to 1e-6 (here they come out bit-identical; the slack
covers LAPACK/BLAS builds that order sums differently). CorDA calibrates on batches of one
sequence, as PEFT's preprocess_corda requires.
"""

import copy
import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora.config import CordaConfig, EvaConfig
from peft.tuners.lora.corda import preprocess_corda
from peft.tuners.lora.eva import initialize_lora_eva_weights

import peftc
from passes.adapters.corda import CorDA
from passes.adapters.eva import EVA
from passes.adapters.registry import methods
from rewrite.spec import SpecError, load_spec
from tests.models import perturb, tiny_gpt2, tiny_llama, token_inputs

TOL = 1e-5  # fp32
INIT_TOL = 1e-6  # same algorithm, same data: see the module docstring

CASES = {
    "llama": (lambda: tiny_llama(layers=1), ["q_proj", "v_proj", "down_proj"]),
    "gpt2": (tiny_gpt2, ["c_attn", "c_fc"]),
}


def _out(model, inputs):
    out = model(**inputs)
    return out if isinstance(out, torch.Tensor) else out[0]


def _peft_tensor(model, path, leaf):
    return dict(model.named_parameters())[f"base_model.model.{path}.{leaf}.default.weight"]


def _shake(peft_model, seed):
    """Trained-looking adapter weights (B no longer zero)."""
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed)
        for n, p in peft_model.named_parameters():
            if "lora_" in n:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)


def _grads_reach_only(adapted, base, peft_model, x, frozen=()):
    adapted.zero_grad(set_to_none=True)
    peft_model.zero_grad(set_to_none=True)
    _out(adapted, x).pow(2).mean().backward()
    _out(peft_model, x).pow(2).mean().backward()
    assert all(p.grad is None for p in base.parameters())
    for n, p in adapted.named_adapter_parameters().items():
        path, leaf = n[len("adapters.") :].rsplit(".", 1)
        if leaf in frozen:
            assert not p.requires_grad and p.grad is None
            continue
        assert leaf in ("lora_A", "lora_B") and p.grad.abs().max() > 0
        torch.testing.assert_close(
            p.grad, _peft_tensor(peft_model, path, leaf).grad, atol=1e-7, rtol=1e-4
        )
    adapted.zero_grad(set_to_none=True)
    peft_model.zero_grad(set_to_none=True)


def _merge_matches(adapted, peft_model, x):
    merged = adapted.merge()
    with torch.no_grad():
        torch.testing.assert_close(_out(merged, x), _out(adapted, x), atol=TOL, rtol=TOL)
    theirs = dict(copy.deepcopy(peft_model).merge_and_unload().named_parameters())
    ours = dict(merged.named_parameters())
    for a in adapted.plan:
        torch.testing.assert_close(ours[a.site.weight], theirs[a.site.weight], atol=TOL, rtol=TOL)


def _costs_match(adapted, peft_model):
    trainable, _ = peft_model.get_nb_trainable_parameters()
    assert adapted.plan.trainable_parameters() == trainable
    assert sum(p.numel() for p in adapted.trainable_parameters()) == trainable
    assert (
        sum(a.method.cost(a.site).evaluate(tokens=3)["params"] for a in adapted.plan) == trainable
    )


# -- EVA ---------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=list(CASES))
def eva(request, tmp_path_factory):
    name = request.param
    make, targets = CASES[name]
    base = make()
    batches = [token_inputs(2, 16, seed=10 + i) for i in range(4)]
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=targets,
        init_lora_weights="eva",
        eva_config=EvaConfig(rho=1.0, tau=0.9),
    )
    peft_model = get_peft_model(copy.deepcopy(base), config).eval()
    initialize_lora_eva_weights(peft_model, dataloader=batches, show_progress_bar=False)
    peft_init = {n: p.detach().clone() for n, p in peft_model.named_parameters() if "lora_A" in n}
    spec = {"adapters": [{"method": "eva", "targets": targets, "rank": 4, "alpha": 8, "tau": 0.9}]}
    ours = peftc.compile(base, spec, token_inputs(), calibration=batches).eval()
    _shake(peft_model, seed=3)
    path = tmp_path_factory.mktemp(f"eva_{name}")
    peft_model.save_pretrained(path)
    loaded = peftc.from_peft(base, path, token_inputs()).eval()  # no calibration needed
    return base, peft_model, peft_init, ours, loaded


def test_eva_init_matches_peft_is_identity_and_peft_loads_our_save(eva, tmp_path):
    base, _, peft_init, ours, _ = eva
    for a in ours.plan:
        A = ours.state()[f"adapters.{a.site.path}.lora_A"]
        expected = peft_init[f"base_model.model.{a.site.path}.lora_A.default.weight"]
        torch.testing.assert_close(A, expected, atol=INIT_TOL, rtol=0)
    x = token_inputs(3, 9, seed=5)
    with torch.no_grad():
        torch.testing.assert_close(_out(ours, x), _out(base, x), atol=TOL, rtol=TOL)
        perturb(ours.trainable_parameters(), std=0.05, seed=4)
        expected = _out(ours, x)
        assert (expected - _out(base, x)).abs().max() > 1e-3
    ours.save_adapter(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["init_lora_weights"] == "eva" and config["eva_config"]["rho"] == 1.0
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(_out(peft_model, x), expected, atol=TOL, rtol=TOL)


def test_eva_peft_checkpoint_loads_into_peftc(eva):
    base, peft_model, _, _, loaded = eva
    assert {a.method.name for a in loaded.plan} == {"eva"}
    x = token_inputs(3, 9, seed=6)
    with torch.no_grad():
        expected = _out(peft_model, x)
        assert (expected - _out(base, x)).abs().max() > 1e-3
        torch.testing.assert_close(_out(loaded, x), expected, atol=TOL, rtol=TOL)


def test_eva_merge_gradients_costs(eva):
    base, peft_model, _, _, loaded = eva
    _merge_matches(loaded, peft_model, token_inputs(3, 9, seed=7))
    _grads_reach_only(loaded, base, peft_model, token_inputs(3, 9, seed=8))
    _costs_match(loaded, peft_model)


# -- CorDA -------------------------------------------------------------------------------

CORDA_MODE = {"llama": "ipm", "gpt2": "kpm"}


@pytest.fixture(scope="module", params=list(CASES))
def corda(request, tmp_path_factory):
    name = request.param
    make, targets = CASES[name]
    base = make()
    batches = [token_inputs(1, 16, seed=20 + i) for i in range(4)]
    mode = CORDA_MODE[name]
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=targets,
        init_lora_weights="corda",
        corda_config=CordaConfig(corda_method=mode),
    )
    residual = copy.deepcopy(base)
    preprocess_corda(residual, config, run_model=lambda: [residual(**b) for b in batches])
    peft_model = get_peft_model(residual, config).eval()
    root = tmp_path_factory.mktemp(f"corda_{name}")
    peft_model.save_pretrained(root / "init")
    peft_init = {n: p.detach().clone() for n, p in peft_model.named_parameters() if "lora_" in n}
    spec = {
        "adapters": [
            {"method": "corda", "targets": targets, "rank": 4, "alpha": 8, "corda_method": mode}
        ]
    }
    ours = peftc.compile(base, spec, token_inputs(), calibration=batches).eval()
    x = token_inputs(3, 9, seed=5)
    with torch.no_grad():
        peft_init_out = _out(peft_model, x)
    _shake(peft_model, seed=3)
    peft_model.save_pretrained(root / "raw")
    peft_model.save_pretrained(
        root / "converted", path_initial_model_for_weight_conversion=str(root / "init")
    )
    loaded = peftc.from_peft(base, root / "raw", token_inputs(), calibration=batches).eval()
    return base, peft_model, peft_init, peft_init_out, ours, loaded, root


def test_corda_init_matches_peft_is_identity_and_peft_loads_our_save(corda, tmp_path):
    base, _, peft_init, peft_init_out, ours, _, _ = corda
    state = ours.state()
    for a in ours.plan:
        for leaf in ("lora_A", "lora_B"):
            expected = peft_init[f"base_model.model.{a.site.path}.{leaf}.default.weight"]
            torch.testing.assert_close(
                state[f"adapters.{a.site.path}.{leaf}"], expected, atol=INIT_TOL, rtol=1e-5
            )
    x = token_inputs(3, 9, seed=5)
    with torch.no_grad():
        torch.testing.assert_close(_out(ours, x), _out(base, x), atol=TOL, rtol=TOL)
        torch.testing.assert_close(_out(ours, x), peft_init_out, atol=TOL, rtol=TOL)
        perturb(ours.trainable_parameters(), std=0.05, seed=4)
        expected = _out(ours, x)
        assert (expected - _out(base, x)).abs().max() > 1e-3
    ours.save_adapter(tmp_path)  # PEFT's converted form: a rank-2r LoRA on the original base
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (config["r"], config["init_lora_weights"]) == (8, True)
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(_out(peft_model, x), expected, atol=TOL, rtol=TOL)


def test_corda_raw_peft_checkpoint_loads_with_calibration(corda):
    base, peft_model, _, _, _, loaded, _ = corda
    assert {a.method.name for a in loaded.plan} == {"corda"}
    x = token_inputs(3, 9, seed=6)
    with torch.no_grad():
        expected = _out(peft_model, x)
        assert (expected - _out(base, x)).abs().max() > 1e-3
        torch.testing.assert_close(_out(loaded, x), expected, atol=TOL, rtol=TOL)


def test_corda_reads_peft_converted_checkpoint(corda):
    base, peft_model, _, _, _, loaded, root = corda
    config = json.loads((root / "converted" / "adapter_config.json").read_text())
    assert (config["r"], config["init_lora_weights"]) == (8, True)
    # Rank 2r, [A; A0] and [B, -B0]: read back into the four tensors.
    loaded.load_adapter(root / "converted")
    x = token_inputs(3, 9, seed=7)
    with torch.no_grad():
        torch.testing.assert_close(_out(loaded, x), _out(peft_model, x), atol=TOL, rtol=TOL)


def test_corda_merge_gradients_costs(corda):
    base, peft_model, _, _, _, loaded, _ = corda
    _merge_matches(loaded, peft_model, token_inputs(3, 9, seed=8))
    _grads_reach_only(
        loaded, base, peft_model, token_inputs(3, 9, seed=9), frozen=("lora_A0", "lora_B0")
    )
    _costs_match(loaded, peft_model)


def test_corda_raw_checkpoint_without_calibration_says_what_to_do(corda):
    base, _, _, _, ours, _, _ = corda
    a = ours.plan.assignments[0]
    W = dict(base.named_parameters())[a.site.weight]
    with pytest.raises(ValueError, match="calibration=batches.*path_initial_model_for_weight"):
        a.method.init(a.site, W.t() if a.site.op == "addmm" else W, None, torch.Generator())


# -- errors ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cls, kwargs, message",
    [
        (EVA, {"rank": -1}, "eva: rank must be"),
        (EVA, {"tau": 1.5}, r"eva: tau must be in \[0, 1\]"),
        (EVA, {"rho": 2.0}, "eva: rho must be 1.0"),
        (EVA, {"whiten": "yes"}, "eva: whiten must be"),
        (CorDA, {"alpha": 0}, "corda: alpha must be"),
        (CorDA, {"corda_method": "best"}, r"corda: corda_method must be one of \('ipm', 'kpm'\)"),
        (CorDA, {"dropout": 1}, r"corda: dropout must be in \[0, 1\)"),
    ],
)
def test_bad_hyperparameters_are_refused(cls, kwargs, message):
    with pytest.raises(ValueError, match=message):
        cls(**kwargs)


def test_spec_errors_name_the_problem():
    registry = methods()
    with pytest.raises(SpecError, match="eva: tau must be"):
        load_spec({"adapters": [{"method": "eva", "targets": ["*"], "tau": -1}]}, registry)
    # Data-driven inits refuse to start without data, and say how to give it.
    with pytest.raises(ValueError, match=r"calibration=batches"):
        peftc.compile(
            tiny_gpt2(), {"adapters": [{"method": "eva", "targets": ["c_fc"]}]}, token_inputs()
        )
