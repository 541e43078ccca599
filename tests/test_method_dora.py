"""DoRA against PEFT's LoraConfig(use_dora=True): checkpoints both ways, identity, merge,
gradients, costs, errors (fp32, 1e-5); and one spec mixing DoRA with LoRA."""

import copy

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

import peftc
from passes.adapters.dora import DoRA
from passes.adapters.registry import methods
from rewrite.spec import SpecError, load_spec, resolve
from tests.models import convnet, image_inputs, perturb, tiny_gpt2, tiny_llama, token_inputs

TOL = 1e-5  # fp32

CASES = {
    "llama": (tiny_llama, ["q_proj", "v_proj", "down_proj", "embed_tokens"]),
    "gpt2": (tiny_gpt2, ["c_attn", "c_fc"]),
    "convnet": (convnet, ["conv1", "conv2", "conv3", "head"]),
}


def _inputs(name, seed=0, batch=2, seq=16):
    return (
        image_inputs(batch, seed=seed) if name == "convnet" else token_inputs(batch, seq, seed=seed)
    )


def _out(model, inputs):
    out = model(**inputs) if isinstance(inputs, dict) else model(*inputs)
    return out if isinstance(out, torch.Tensor) else out[0]


def _no_dropout(model):
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    return model


@pytest.fixture(scope="module", params=list(CASES))
def from_peft_case(request, tmp_path_factory):
    """A PEFT DoRA model with non-trivial A, B and magnitude, and peftc's load of its checkpoint."""
    name = request.param
    make, targets = CASES[name]
    base = _no_dropout(make())
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=targets, use_dora=True, init_lora_weights=False
    )
    peft_model = get_peft_model(copy.deepcopy(base), config).eval()
    with torch.no_grad():  # magnitudes away from ‖W + sBA‖, so m/‖·‖ ≠ 1
        g = torch.Generator().manual_seed(3)
        for n, p in peft_model.named_parameters():
            if "lora_magnitude_vector" in n:
                p.mul_(1 + 0.2 * torch.randn(p.shape, generator=g))
    path = tmp_path_factory.mktemp(f"dora_{name}")
    peft_model.save_pretrained(path, save_embedding_layers=False)
    adapted = peftc.from_peft(base, path, _inputs(name)).eval()
    return name, base, peft_model, adapted


def test_peft_checkpoint_loads_into_peftc(from_peft_case):
    name, base, peft_model, adapted = from_peft_case
    assert {a.method.name for a in adapted.plan} == {"dora"}
    x = _inputs(name, seed=5, batch=3, seq=9)
    with torch.no_grad():
        expected = _out(peft_model, x)
        assert (expected - _out(base, x)).abs().max() > 1e-3
        torch.testing.assert_close(_out(adapted, x), expected, atol=TOL, rtol=TOL)


def test_merge_matches_unmerged_and_peft(from_peft_case):
    name, base, peft_model, adapted = from_peft_case
    x = _inputs(name, seed=6, batch=3, seq=9)
    merged = adapted.merge()
    with torch.no_grad():
        torch.testing.assert_close(_out(merged, x), _out(adapted, x), atol=TOL, rtol=TOL)
    peft_merged = dict(copy.deepcopy(peft_model).merge_and_unload().named_parameters())
    ours = dict(merged.named_parameters())
    for a in adapted.plan:
        assert (ours[a.site.weight] - dict(base.named_parameters())[a.site.weight]).abs().max() > 0
        torch.testing.assert_close(
            ours[a.site.weight], peft_merged[a.site.weight], atol=TOL, rtol=TOL
        )


def test_costs_match_peft_trainable_count(from_peft_case):
    _, _, peft_model, adapted = from_peft_case
    trainable, _ = peft_model.get_nb_trainable_parameters()
    assert adapted.plan.trainable_parameters() == trainable
    assert sum(p.numel() for p in adapted.trainable_parameters()) == trainable
    assert (
        sum(a.method.cost(a.site).evaluate(tokens=7)["params"] for a in adapted.plan) == trainable
    )


@pytest.mark.parametrize("name", list(CASES))
def test_spec_identity_at_init_then_peft_loads(name, tmp_path):
    make, targets = CASES[name]
    base = make()
    spec = {"adapters": [{"method": "dora", "targets": targets, "rank": 4, "alpha": 8}]}
    adapted = peftc.compile(base, spec, _inputs(name)).eval()
    x = _inputs(name, seed=7, batch=3, seq=9)
    with torch.no_grad():
        torch.testing.assert_close(_out(adapted, x), _out(base, x), atol=TOL, rtol=TOL)
        perturb(adapted.trainable_parameters(), std=0.1, seed=4)
        for n, p in adapted.named_adapter_parameters().items():
            if n.endswith(".magnitude"):  # keep magnitudes positive and near the row norms
                p.copy_(p.abs() + 1.0)
        ours = _out(adapted, x)
        assert (ours - _out(base, x)).abs().max() > 1e-3
    adapted.save_adapter(tmp_path)
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    assert peft_model.peft_config["default"].use_dora
    with torch.no_grad():
        torch.testing.assert_close(_out(peft_model, x), ours, atol=TOL, rtol=TOL)


def test_gradients_match_peft_and_reach_only_adapter_tensors(from_peft_case):
    name, base, peft_model, adapted = from_peft_case
    # Eval mode: the same graph as training here (no dropout); train mode is covered below.
    x = _inputs(name, seed=8, batch=3, seq=9)
    adapted.zero_grad(set_to_none=True)
    peft_model.zero_grad(set_to_none=True)
    _out(adapted, x).pow(2).mean().backward()
    _out(peft_model, x).pow(2).mean().backward()
    assert all(p.grad is None for p in base.parameters())
    declared = {
        f"adapters.{a.site.path}.{n}"
        for a in adapted.plan
        for n, s in a.method.params(a.site).items()
        if s.trainable
    }
    got = {n for n, p in adapted.named_adapter_parameters().items() if p.grad is not None}
    assert got == declared
    theirs = dict(peft_model.named_parameters())
    suffix = {
        "lora_A": ["lora_A.default.weight", "lora_embedding_A.default"],
        "lora_B": ["lora_B.default.weight", "lora_embedding_B.default"],
        "magnitude": ["lora_magnitude_vector.default.weight"],
    }
    for n, p in adapted.named_adapter_parameters().items():
        path, leaf = n[len("adapters.") :].rsplit(".", 1)
        (key,) = [k for s in suffix[leaf] if (k := f"base_model.model.{path}.{s}") in theirs]
        assert p.grad.abs().max() > 0
        # The weight norm is detached in both: a norm that took gradients would change these.
        torch.testing.assert_close(p.grad, theirs[key].grad, atol=1e-7, rtol=1e-4)
    adapted.zero_grad(set_to_none=True)
    peft_model.zero_grad(set_to_none=True)


def test_spec_mixes_dora_on_attention_with_lora_on_mlp():
    base = _no_dropout(tiny_gpt2()).train()
    spec = {
        "adapters": [
            {"method": "dora", "targets": ["*.attn.c_attn"], "rank": 4},
            {"method": "lora", "targets": ["*.mlp.c_fc"], "rank": 2},
        ]
    }
    adapted = peftc.compile(base, spec, token_inputs())  # traced in training mode
    assert adapted.training
    methods_by_type = {a.site.module_type: a.method.name for a in adapted.plan}
    assert methods_by_type == {"attn.c_attn": "dora", "mlp.c_fc": "lora"}
    perturb(adapted.trainable_parameters(), std=0.05, seed=2)
    with torch.no_grad():
        for n, p in adapted.named_adapter_parameters().items():
            if n.endswith(".magnitude"):
                p.add_(1.0)
    x = token_inputs(2, 9, seed=9)
    out = _out(adapted, x)
    with torch.no_grad():
        assert (out - _out(base, x)).abs().max() > 1e-3
    out.pow(2).mean().backward()
    names = adapted.named_adapter_parameters()
    assert {n.rsplit(".", 1)[1] for n in names if ".attn." in n} == {
        "lora_A",
        "lora_B",
        "magnitude",
    }
    assert {n.rsplit(".", 1)[1] for n in names if ".mlp." in n} == {"lora_A", "lora_B"}
    assert all(p.grad is not None and p.grad.abs().max() > 0 for p in names.values())
    assert all(p.grad is None for p in base.parameters())


def test_training_with_dropout_matches_peft_under_the_same_seed(tmp_path):
    # PEFT drops out the adapter's input (and, for DoRA, recomputes the base part on it); the
    # traced graph draws the same masks in the same order, so seeded runs agree exactly.
    base = _no_dropout(tiny_gpt2()).train()
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        lora_dropout=0.3,
        target_modules=["c_attn", "c_fc"],
        use_dora=True,
        init_lora_weights=False,
    )
    peft_model = get_peft_model(copy.deepcopy(base), config).train()
    with torch.no_grad():
        g = torch.Generator().manual_seed(5)
        for n, p in peft_model.named_parameters():
            if "lora_" in n:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    peft_model.save_pretrained(tmp_path)
    adapted = peftc.from_peft(base, tmp_path, token_inputs())
    assert adapted.training and {a.method.name for a in adapted.plan} == {"dora"}
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
        ({"rank": 2.5}, "rank"),
        ({"alpha": 0}, "alpha"),
        ({"dropout": 1.0}, "dropout"),
        ({"use_rslora": "yes"}, "use_rslora"),
        ({"init_weights": "pissa"}, "init_weights"),
    ],
)
def test_bad_hyperparameters_are_refused(kwargs, field):
    with pytest.raises(ValueError, match=rf"dora: {field} must be"):
        DoRA(**kwargs)


def test_spec_errors_name_the_problem(from_peft_case):
    _, _, _, adapted = from_peft_case
    registry = methods()
    with pytest.raises(SpecError, match="dora: dropout must be in"):
        load_spec({"adapters": [{"method": "dora", "targets": ["*"], "dropout": 2}]}, registry)
    too_big = load_spec({"adapters": [{"method": "dora", "targets": ["*"], "rank": 100}]}, registry)
    with pytest.raises(SpecError, match="rank 100 is larger than the layer allows"):
        resolve(too_big, adapted.sites, registry)
