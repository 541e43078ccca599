"""GraLoRA against PEFT's GraloraConfig on tiny Llama (hybrid) and GPT-2 (Conv1D), fp32, 1e-5."""

import copy

import pytest
import torch
from peft import GraloraConfig, get_peft_model

from passes.adapters.gralora import GraLoRA
from passes.adapters.registry import methods
from rewrite.spec import SpecError, load_spec, resolve
from tests.method_checks import (
    assert_costs_match,
    assert_gradients_reach_declared,
    assert_identity_at_init,
    assert_merge_matches,
    assert_peft_parity,
    assert_peftc_to_peft,
    compiled_case,
    from_peft_case,
)

STD = 0.1
LLAMA = ["q_proj", "v_proj", "down_proj"]
GPT2 = ["c_attn", "c_proj", "c_fc"]  # Conv1D (addmm) sites


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """Hybrid GraLoRA (a plain rank-2 LoRA beside the k=2 blocks)."""
    spec = {
        "adapters": [
            {"method": "gralora", "targets": LLAMA, "rank": 8, "alpha": 16, "k": 2, "hybrid_r": 2}
        ]
    }
    config = GraloraConfig(r=8, alpha=16, gralora_k=2, hybrid_r=2, target_modules=LLAMA)
    return compiled_case("llama", spec, config, tmp_path_factory.mktemp("peft"), STD)


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    config = GraloraConfig(r=8, alpha=8, gralora_k=4, target_modules=GPT2, fan_in_fan_out=True)
    return from_peft_case("gpt2", config, tmp_path_factory.mktemp("peft"), STD)


@pytest.fixture(params=["llama", "gpt2"])
def case(request):
    return request.getfixturevalue(request.param)


def test_peft_checkpoint_loads_into_peftc(case):
    assert_peft_parity(case)


def test_from_peft_reads_the_hyperparameters(gpt2):
    assert {a.method for a in gpt2.adapted.plan} == {GraLoRA(rank=8, alpha=8, k=4)}
    assert {a.site.op for a in gpt2.adapted.plan} == {"addmm"}


def test_peftc_checkpoint_loads_into_peft(case, tmp_path):
    config = assert_peftc_to_peft(case, tmp_path, STD)
    assert config["peft_type"] == "GRALORA"
    assert config["fan_in_fan_out"] == (case.arch == "gpt2")


def test_identity_at_init(llama):
    assert_identity_at_init(llama)


def test_merge_matches_peft(case):
    assert_merge_matches(case)


def test_update_reaches_rank_k_times_r(llama):
    """Each k×k block is rank r/k, so the update's rank is min(k·r, ...) = 16 for r=8, k=2,
    beyond a rank-8 LoRA (without the hybrid part)."""
    a = next(a for a in llama.adapted.plan if a.path.endswith("q_proj"))
    state = llama.adapted.state()
    p = {n: state[f"adapters.{a.path}.{n}"].detach() for n in ("gralora_A", "gralora_B")}
    delta = GraLoRA(rank=8, alpha=16, k=2).delta(p)
    assert torch.linalg.matrix_rank(delta) == 16


def test_gradients_reach_exactly_the_declared_tensors(llama):
    assert_gradients_reach_declared(llama)


def test_costs_match_peft(case):
    n = assert_costs_match(case)
    expected = sum(
        (a.method.rank + a.method.hybrid_r) * (a.site.in_features + a.site.out_features)
        for a in case.adapted.plan
    )
    assert n == expected


def test_k_that_does_not_divide_the_features_is_refused_as_peft_does(llama):
    # rank 6 is divisible by k=3, but 64 features are not
    spec = load_spec(
        {"adapters": [{"method": "gralora", "targets": ["q_proj"], "rank": 6, "k": 3}]}, methods()
    )
    with pytest.raises(SpecError, match="k 3 does not divide in_features 64"):
        resolve(spec, llama.adapted.sites, methods())
    config = GraloraConfig(r=6, gralora_k=3, target_modules=["q_proj"])
    with pytest.raises(ValueError, match="in_features should be divisible by gralora_k"):
        get_peft_model(copy.deepcopy(llama.base), config)


def test_rank_not_divisible_by_k_is_refused_as_peft_does():
    with pytest.raises(SpecError, match="rank 8 must be divisible by k 3"):
        load_spec(
            {"adapters": [{"method": "gralora", "targets": ["q_proj"], "rank": 8, "k": 3}]},
            methods(),
        )
    with pytest.raises(ValueError, match="r should be divisible by gralora_k"):
        GraloraConfig(r=8, gralora_k=3)


@pytest.mark.parametrize(
    "hyper, message",
    [
        ({"k": 0}, "k must be an integer >= 1"),
        ({"hybrid_r": -1}, "hybrid_r must be an integer >= 0"),
        ({"alpha": 0}, "alpha must be a positive number"),
        ({"dropout": 1.5}, r"dropout must be in \[0, 1\)"),
    ],
)
def test_bad_hyperparameters_are_refused(hyper, message):
    with pytest.raises(SpecError, match=message):
        load_spec(
            {"adapters": [{"method": "gralora", "targets": ["q_proj"], "rank": 8, **hyper}]},
            methods(),
        )
