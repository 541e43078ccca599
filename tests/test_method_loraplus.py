"""LoRA+ against PEFT: LoRA checkpoints both ways on tiny Llama and GPT-2, and the optimizer
against peft.optimizers.create_loraplus_optimizer (groups, learning rates, one AdamW step)."""

import copy

import pytest
import torch
from peft import LoraConfig
from peft.optimizers import create_loraplus_optimizer as peft_create_loraplus_optimizer

import peftc
from passes.adapters.lora import LoRA
from passes.adapters.loraplus import LoRAPlus
from passes.adapters.registry import methods
from peftc.peft_format import claims, method_for_config, peft_key, spec_from_peft
from rewrite.names import param_target
from rewrite.spec import SpecError, load_spec
from tests.method_checks import (
    assert_costs_match,
    assert_gradients_reach_declared,
    assert_identity_at_init,
    assert_merge_matches,
    assert_peft_parity,
    assert_peftc_to_peft,
    compiled_case,
    fresh_inputs,
    out_with_grad,
)

STD = 0.05
RATIO, LR_EMBEDDING = 4.0, 5e-4
LLAMA = ["q_proj", "v_proj", "embed_tokens"]
GPT2 = ["c_attn", "c_fc"]


def _spec(targets):
    return {
        "adapters": [
            {
                "method": "loraplus",
                "targets": targets,
                "rank": 4,
                "alpha": 8,
                "loraplus_lr_ratio": RATIO,
                "loraplus_lr_embedding": LR_EMBEDDING,
            }
        ]
    }


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    config = LoraConfig(r=4, lora_alpha=8, target_modules=LLAMA)
    return compiled_case("llama", _spec(LLAMA), config, tmp_path_factory.mktemp("peft"), STD)


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    config = LoraConfig(r=4, lora_alpha=8, target_modules=GPT2, fan_in_fan_out=True)
    return compiled_case("gpt2", _spec(GPT2), config, tmp_path_factory.mktemp("peft"), STD)


@pytest.fixture(params=["llama", "gpt2"])
def case(request):
    return request.getfixturevalue(request.param)


def test_peft_lora_checkpoint_loads_into_peftc(case):
    assert {a.method.name for a in case.adapted.plan} == {"loraplus"}
    assert_peft_parity(case)


def test_peftc_checkpoint_is_a_plain_peft_lora_one(case, tmp_path):
    config = assert_peftc_to_peft(case, tmp_path, STD)
    assert config["peft_type"] == "LORA"
    assert not any("loraplus" in key for key in config)  # LoRA+ leaves no trace
    assert method_for_config(config) is LoRA  # so it reads back as lora
    assert not claims(LoRAPlus, config)
    assert spec_from_peft(config, case.adapted.sites)["adapters"][0]["method"] == "lora"


def test_identity_at_init(case):
    assert_identity_at_init(case)


def test_merge_matches_peft(case):
    assert_merge_matches(case)


def test_gradients_reach_exactly_a_and_b(llama):
    assert_gradients_reach_declared(llama)


def test_costs_match_peft(case):
    n = assert_costs_match(case)
    lora = sum(LoRA(rank=4).cost(a.site).evaluate()["params"] for a in case.adapted.plan)
    assert n == lora  # LoRA+ trains exactly LoRA's tensors


def _peft_name_to_ours(adapted) -> dict[str, str]:
    return {
        peft_key(a.method, a.site, n): param_target(a.method, a.site, n)
        for a in adapted.plan
        for n in a.method.params(a.site)
    }


def _groups_by_name(optimizer, names: dict) -> list[tuple[float, float, list[str]]]:
    return [
        (g["lr"], g["weight_decay"], sorted(names[id(p)] for p in g["params"]))
        for g in optimizer.param_groups
    ]


def test_optimizer_matches_peft_create_loraplus_optimizer(llama):
    adapted = llama.adapted
    theirs_model = copy.deepcopy(llama.peft)
    kwargs = {"weight_decay": 0.1, "loraplus_weight_decay": 0.05, "betas": (0.8, 0.95)}
    ours = peftc.create_loraplus_optimizer(adapted, torch.optim.AdamW, 1e-3, **kwargs)
    theirs = peft_create_loraplus_optimizer(
        theirs_model,
        torch.optim.AdamW,
        lr=1e-3,
        loraplus_lr_ratio=RATIO,
        loraplus_lr_embedding=LR_EMBEDDING,
        **kwargs,
    )
    to_ours = _peft_name_to_ours(adapted)
    their_names = {
        id(p): to_ours[n.replace(".default", "")]
        for n, p in theirs_model.named_parameters()
        if p.requires_grad
    }
    our_names = {id(p): n for n, p in adapted.named_parameters()}
    groups = _groups_by_name(ours, our_names)
    assert groups == _groups_by_name(theirs, their_names)
    # A at lr; embedding adapters at their own lr; B at lr·ratio
    assert [(lr, len(names)) for lr, _, names in groups] == [
        (1e-3, 4),
        (LR_EMBEDDING, 2),
        (1e-3 * RATIO, 4),
        (1e-3 * RATIO, 0),
    ]
    assert ours.defaults["betas"] == (0.8, 0.95) and ours.defaults["weight_decay"] == 0.1

    before = {n: p.detach().clone() for n, p in adapted.named_adapter_parameters().items()}
    try:
        x = fresh_inputs("llama")
        out_with_grad(adapted, x).pow(2).mean().backward()
        out_with_grad(theirs_model, x).pow(2).mean().backward()
        ours.step()
        theirs.step()
        stepped = dict(theirs_model.named_parameters())
        for peft_name, name in to_ours.items():
            ours_now = adapted.named_adapter_parameters()[name]
            theirs_now = next(
                p for n, p in stepped.items() if n.replace(".default", "") == peft_name
            )
            assert not torch.equal(ours_now, before[name]), name  # the step moved it
            torch.testing.assert_close(ours_now, theirs_now, atol=1e-6, rtol=1e-6)
    finally:
        with torch.no_grad():
            for n, p in adapted.named_adapter_parameters().items():
                p.copy_(before[n])
        adapted.zero_grad(set_to_none=True)


def test_optimizer_ratio_argument_overrides_the_spec(gpt2):
    opt = peftc.create_loraplus_optimizer(gpt2.adapted, torch.optim.SGD, 0.01, 2.0)
    assert [g["lr"] for g in opt.param_groups] == [0.01, LR_EMBEDDING, 0.02, 0.02]
    assert [len(g["params"]) for g in opt.param_groups] == [4, 0, 4, 0]


@pytest.mark.parametrize(
    "hyper, message",
    [
        ({"loraplus_lr_ratio": 0}, "loraplus_lr_ratio must be a positive finite number"),
        ({"loraplus_lr_ratio": float("inf")}, "loraplus_lr_ratio must be a positive finite number"),
        ({"loraplus_lr_embedding": -1e-6}, "loraplus_lr_embedding must be a positive finite"),
        ({"rank": 0}, "rank must be a positive integer"),
    ],
)
def test_bad_hyperparameters_are_refused(hyper, message):
    with pytest.raises(SpecError, match=message):
        load_spec({"adapters": [{"method": "loraplus", "targets": ["q_proj"], **hyper}]}, methods())
