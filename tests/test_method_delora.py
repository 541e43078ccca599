"""DeLoRA against PEFT's DeloraConfig on tiny Llama and MiniLM (BERT), fp32, 1e-5."""

import pytest
import torch
from peft import DeloraConfig
from safetensors.torch import load_file

from passes.adapters.registry import methods
from rewrite.spec import SpecError, load_spec, resolve
from tests.method_checks import (
    assert_costs_match,
    assert_merge_matches,
    assert_peft_parity,
    assert_peftc_to_peft,
    from_peft_case,
    shared_case,
)

STD = 0.3  # perturbation of A, B and λ: large enough that the update shows
MINILM = ["query", "value", "intermediate.dense"]


@pytest.fixture
def llama(method_model):
    """The shared delora model (tests/method_cases.py): tiny Llama, rank 4, default init."""
    return shared_case(method_model("delora"))


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    """peftc.from_peft turns PEFT's config (with rank and lambda patterns) into a spec."""
    config = DeloraConfig(
        r=4,
        delora_lambda=2,
        target_modules=MINILM,
        rank_pattern={"encoder.layer.0.attention.self.query": 6},
        lambda_pattern={"value": 5},
    )
    return from_peft_case("minilm", config, tmp_path_factory.mktemp("peft"), STD)


@pytest.fixture(params=["llama", "bert"])
def case(request):
    return request.getfixturevalue(request.param)


def test_peft_checkpoint_loads_into_peftc(bert):
    assert_peft_parity(bert)


def test_peft_patterns_become_overrides(bert):
    by_path = {a.path: a.method for a in bert.adapted.plan}
    assert by_path["encoder.layer.0.attention.self.query"].rank == 6
    assert by_path["encoder.layer.1.attention.self.query"].rank == 4
    assert by_path["encoder.layer.1.attention.self.value"].delora_lambda == 5
    assert by_path["encoder.layer.1.attention.self.query"].delora_lambda == 2


def test_peftc_checkpoint_loads_into_peft(case, tmp_path):
    config = assert_peftc_to_peft(case, tmp_path, STD)
    assert config["peft_type"] == "DELORA"
    # the frozen w_norm buffer ships with the adapter, as PEFT's own checkpoints do
    saved = load_file(tmp_path / "adapter_model.safetensors")
    for a in case.adapted.plan:
        key = f"base_model.model.{a.path}.delora_w_norm"
        assert torch.equal(saved[key], case.adapted.state()[f"adapters.{a.path}.delora_w_norm"])


def test_merge_matches_peft(bert):
    assert_merge_matches(bert)


def test_only_a_b_and_lambda_train(llama):
    trained = {n.rsplit(".", 1)[1] for n, p in llama.adapted.named_parameters() if p.requires_grad}
    assert trained == {"delora_A", "delora_B", "delora_lambda"}  # w_norm stays frozen


def test_costs_match_peft(bert):
    assert assert_costs_match(bert) > 0


def test_w_norm_is_the_base_weights_column_norm(llama):
    a = llama.adapted.plan.assignments[0]
    state = llama.adapted.state()
    w_norm = state[f"adapters.{a.path}.delora_w_norm"]
    expected = llama.base.get_submodule(a.path).weight.norm(dim=0)
    torch.testing.assert_close(w_norm, expected, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize(
    "hyper, message",
    [
        ({"rank": 0}, "rank must be a positive integer"),
        ({"delora_lambda": -1.0}, r"delora_lambda \(the norm bound\) must be >= 0"),
        ({"dropout": 1.0}, r"dropout must be in \[0, 1\)"),
    ],
)
def test_bad_hyperparameters_are_refused(hyper, message):
    spec = {"adapters": [{"method": "delora", "targets": ["q_proj"], **hyper}]}
    with pytest.raises(SpecError, match=message):
        load_spec(spec, methods())


def test_unsupported_sites_are_refused(llama):
    spec = load_spec({"adapters": [{"method": "delora", "targets": ["embed_tokens"]}]}, methods())
    with pytest.raises(SpecError, match="delora supports linear layers only"):
        resolve(spec, llama.adapted.sites, methods())
