"""PiSSA against PEFT's init_lora_weights="pissa" (fp32, 1e-5): raw and converted checkpoints
both ways on the original base, the init itself, identity, merge, gradients, costs, errors."""

import copy
import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

import peftc
from passes.adapters.pissa import PiSSA
from passes.adapters.registry import methods
from rewrite.spec import SpecError, load_spec, resolve
from tests.models import perturb, tiny_gpt2, tiny_llama, token_inputs

TOL = 1e-5  # fp32

CASES = {
    "llama": (tiny_llama, ["q_proj", "v_proj", "down_proj"]),
    "gpt2": (tiny_gpt2, ["c_attn", "c_fc"]),
}


def _out(model, inputs):
    out = model(**inputs)
    return out if isinstance(out, torch.Tensor) else out[0]


def _no_dropout(model):
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    return model


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory):
    """PEFT's PiSSA model (residual base) with trained-looking A/B, saved raw and converted,
    and peftc's load of the raw checkpoint onto the original base."""
    name = request.param
    make, targets = CASES[name]
    base = _no_dropout(make())
    config = LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights="pissa")
    peft_model = get_peft_model(copy.deepcopy(base), config).eval()
    root = tmp_path_factory.mktemp(f"pissa_{name}")
    peft_model.save_pretrained(root / "init")
    with torch.no_grad():
        g = torch.Generator().manual_seed(3)
        for n, p in peft_model.named_parameters():
            if "lora_" in n:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    peft_model.save_pretrained(root / "raw")
    peft_model.save_pretrained(
        root / "converted", path_initial_model_for_weight_conversion=str(root / "init")
    )
    adapted = peftc.from_peft(base, root / "raw", token_inputs()).eval()
    return name, base, peft_model, adapted, root


def test_raw_peft_checkpoint_loads_onto_original_base(case):
    _, base, peft_model, adapted, _ = case
    assert {a.method.name for a in adapted.plan} == {"pissa"}
    x = token_inputs(3, 9, seed=5)
    with torch.no_grad():
        expected = _out(peft_model, x)
        assert (expected - _out(base, x)).abs().max() > 1e-3
        torch.testing.assert_close(_out(adapted, x), expected, atol=TOL, rtol=TOL)
    # The user's base weights are untouched (PEFT rewrote its copy to the residual).
    fresh = CASES[case[0]][0]()
    for a in adapted.plan:
        w = dict(base.named_parameters())[a.site.weight]
        torch.testing.assert_close(w, dict(fresh.named_parameters())[a.site.weight], atol=0, rtol=0)


def test_converted_peft_checkpoint_loads_as_lora(case):
    _, base, peft_model, _, root = case
    config = json.loads((root / "converted" / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["init_lora_weights"] is True
    adapted = peftc.from_peft(base, root / "converted", token_inputs()).eval()
    assert {(a.method.name, a.rank) for a in adapted.plan} == {("lora", 8)}
    x = token_inputs(3, 9, seed=6)
    with torch.no_grad():
        torch.testing.assert_close(_out(adapted, x), _out(peft_model, x), atol=TOL, rtol=TOL)


def test_merge_matches_unmerged_and_peft(case):
    _, base, peft_model, adapted, _ = case
    x = token_inputs(3, 9, seed=7)
    merged = adapted.merge()
    with torch.no_grad():
        torch.testing.assert_close(_out(merged, x), _out(adapted, x), atol=TOL, rtol=TOL)
    peft_merged = dict(copy.deepcopy(peft_model).merge_and_unload().named_parameters())
    ours = dict(merged.named_parameters())
    for a in adapted.plan:
        torch.testing.assert_close(
            ours[a.site.weight], peft_merged[a.site.weight], atol=TOL, rtol=TOL
        )


def test_gradients_reach_only_a_and_b(case):
    _, base, peft_model, adapted, _ = case
    x = token_inputs(3, 9, seed=8)
    adapted.zero_grad(set_to_none=True)
    peft_model.zero_grad(set_to_none=True)
    _out(adapted, x).pow(2).mean().backward()
    _out(peft_model, x).pow(2).mean().backward()
    assert all(p.grad is None for p in base.parameters())
    theirs = dict(peft_model.named_parameters())
    for n, p in adapted.named_adapter_parameters().items():
        path, leaf = n[len("adapters.") :].rsplit(".", 1)
        if leaf in ("lora_A0", "lora_B0"):  # frozen: the part taken out of the base weight
            assert not p.requires_grad and p.grad is None
            continue
        assert leaf in ("lora_A", "lora_B")
        peft_grad = theirs[f"base_model.model.{path}.{leaf}.default.weight"].grad
        assert p.grad.abs().max() > 0
        torch.testing.assert_close(p.grad, peft_grad, atol=1e-7, rtol=1e-4)
    adapted.zero_grad(set_to_none=True)
    peft_model.zero_grad(set_to_none=True)


def test_costs_match_peft_trainable_count(case):
    _, _, peft_model, adapted, _ = case
    trainable, _ = peft_model.get_nb_trainable_parameters()
    assert adapted.plan.trainable_parameters() == trainable
    assert sum(p.numel() for p in adapted.trainable_parameters()) == trainable
    assert (
        sum(a.method.cost(a.site).evaluate(tokens=5)["params"] for a in adapted.plan) == trainable
    )


@pytest.mark.parametrize("name", list(CASES))
def test_spec_init_is_peft_init_identity_and_converted_save(name, tmp_path):
    make, targets = CASES[name]
    base = make()
    spec = {"adapters": [{"method": "pissa", "targets": targets, "rank": 4, "alpha": 8}]}
    adapted = peftc.compile(base, spec, token_inputs()).eval()
    x = token_inputs(3, 9, seed=9)
    # The init is PEFT's: the same SVD of the same weight (LAPACK is deterministic here).
    peft_init = PeftModel.from_pretrained(copy.deepcopy(base), _init_dir(base, targets, tmp_path))
    theirs = dict(peft_init.named_parameters())
    state = adapted.state()
    for a in adapted.plan:
        for leaf in ("lora_A", "lora_B"):
            ours = state[f"adapters.{a.site.path}.{leaf}"]
            torch.testing.assert_close(
                ours,
                theirs[f"base_model.model.{a.site.path}.{leaf}.default.weight"],
                atol=1e-6,
                rtol=1e-5,
            )
    with torch.no_grad():
        torch.testing.assert_close(_out(adapted, x), _out(base, x), atol=TOL, rtol=TOL)
        perturb(adapted.trainable_parameters(), std=0.05, seed=4)
        ours = _out(adapted, x)
        assert (ours - _out(base, x)).abs().max() > 1e-3
    adapted.save_adapter(tmp_path / "ours")
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["init_lora_weights"]) == (8, 16, True)
    # The converted form applies to the original, unmodified base model.
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    with torch.no_grad():
        torch.testing.assert_close(_out(peft_model, x), ours, atol=TOL, rtol=TOL)
    # ...and peftc reads its own converted form back into A, B, A0, B0.
    before = {n: p.detach().clone() for n, p in adapted.named_adapter_parameters().items()}
    perturb(adapted.trainable_parameters(), std=0.05, seed=11)
    adapted.load_adapter(tmp_path / "ours")
    for n, p in adapted.named_adapter_parameters().items():
        torch.testing.assert_close(p, before[n], atol=1e-7, rtol=0)


def _init_dir(base, targets, tmp_path):
    config = LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights="pissa")
    get_peft_model(copy.deepcopy(base), config).save_pretrained(tmp_path / "peft_init")
    return tmp_path / "peft_init"


def test_fast_svd_variant_is_seeded_and_close_to_exact(case):
    site = case[3].plan.assignments[0].site
    # A weight with a clear rank-4 part, which a randomized SVD must find.
    g = torch.Generator().manual_seed(0)
    U, _ = torch.linalg.qr(torch.randn(site.out_features, 4, generator=g))
    V, _ = torch.linalg.qr(torch.randn(site.in_features, 4, generator=g))
    W = U @ torch.diag(torch.tensor([10.0, 9.0, 8.0, 7.0])) @ V.t()
    W = W + 0.01 * torch.randn(W.shape, generator=g)
    exact = PiSSA(rank=4, alpha=8).init(site, W, None, torch.Generator().manual_seed(0))
    fast = [
        PiSSA(rank=4, alpha=8, niter=2).init(site, W, None, torch.Generator().manual_seed(1))
        for _ in range(2)
    ]
    torch.testing.assert_close(fast[0]["lora_A0"], fast[1]["lora_A0"], atol=0, rtol=0)
    torch.testing.assert_close(fast[0]["lora_A"], fast[0]["lora_A0"], atol=0, rtol=0)
    top = exact["lora_B0"] @ exact["lora_A0"]
    approx = fast[0]["lora_B0"] @ fast[0]["lora_A0"]
    assert (approx - top).norm() < 1e-3 * top.norm()


def test_training_with_dropout_matches_peft_under_the_same_seed(tmp_path):
    # PEFT drops out the adapter's input (and, for DoRA, recomputes the base part on it); the
    # traced graph draws the same masks in the same order, so seeded runs agree exactly.
    base = _no_dropout(tiny_gpt2()).train()
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        lora_dropout=0.3,
        target_modules=["c_attn", "c_fc"],
        init_lora_weights="pissa",
    )
    peft_model = get_peft_model(copy.deepcopy(base), config).train()
    with torch.no_grad():
        g = torch.Generator().manual_seed(5)
        for n, p in peft_model.named_parameters():
            if "lora_" in n:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    peft_model.save_pretrained(tmp_path)
    adapted = peftc.from_peft(base, tmp_path, token_inputs())
    assert adapted.training and {a.method.name for a in adapted.plan} == {"pissa"}
    x = token_inputs(3, 9, seed=6)
    torch.manual_seed(0)
    ours = _out(adapted, x)
    torch.manual_seed(0)
    theirs = _out(peft_model, x)
    torch.manual_seed(1)
    assert (_out(peft_model, x) - theirs).abs().max() > 1e-3  # dropout is live
    torch.testing.assert_close(ours, theirs, atol=TOL, rtol=TOL)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"rank": 0}, "rank"),
        ({"alpha": -1}, "alpha"),
        ({"dropout": -0.1}, "dropout"),
        ({"use_rslora": 1}, "use_rslora"),
        ({"niter": -2}, "niter"),
    ],
)
def test_bad_hyperparameters_are_refused(kwargs, field):
    with pytest.raises(ValueError, match=rf"pissa: {field} must be"):
        PiSSA(**kwargs)


def test_spec_errors_name_the_problem(case):
    adapted = case[3]
    registry = methods()
    with pytest.raises(SpecError, match="pissa: niter must be"):
        load_spec({"adapters": [{"method": "pissa", "targets": ["*"], "niter": "fast"}]}, registry)
    embed = "model.embed_tokens" if case[0] == "llama" else "transformer.wte"
    spec = load_spec({"adapters": [{"method": "pissa", "targets": [embed]}]}, registry)
    with pytest.raises(SpecError, match="pissa supports linear layers only"):
        resolve(spec, adapted.sites, registry)
