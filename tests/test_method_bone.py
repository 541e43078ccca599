"""Bone (block affine) against PEFT's MissConfig(init_weights="bat") on tiny Llama and
MiniLM (BERT), fp32, 1e-5."""

import copy

import pytest
import torch
from peft import MissConfig, get_peft_model

from passes.adapters.bone import Bone
from passes.adapters.registry import methods
from peftc.peft_format import claims, method_for_config
from rewrite.spec import SpecError, load_spec, resolve
from tests.method_checks import (
    assert_costs_match,
    assert_merge_matches,
    assert_peft_parity,
    assert_peftc_to_peft,
    from_peft_case,
    shared_case,
)

STD = 0.05
MINILM = ["query", "value", "intermediate.dense"]  # 384->384 and 384->1536


@pytest.fixture
def llama(method_model):
    """The shared bone model (tests/method_cases.py): tiny Llama, block size 4."""
    return shared_case(method_model("bone"))


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    config = MissConfig(r=8, init_weights="bat", target_modules=MINILM)
    return from_peft_case("minilm", config, tmp_path_factory.mktemp("peft"), STD)


@pytest.fixture(params=["llama", "bert"])
def case(request):
    return request.getfixturevalue(request.param)


def test_peft_checkpoint_loads_into_peftc(bert):
    assert_peft_parity(bert)


def test_from_peft_reads_the_block_size(bert):
    assert {a.method for a in bert.adapted.plan} == {Bone(rank=8)}


def test_peftc_checkpoint_loads_into_peft(case, tmp_path):
    config = assert_peftc_to_peft(case, tmp_path, STD)
    assert (config["peft_type"], config["init_weights"]) == ("MISS", "bat")


def test_merge_matches_peft(bert):
    assert_merge_matches(bert)


def test_costs_match_peft(case):
    n = assert_costs_match(case)
    # one [out/r, r, r] block tensor per site: out·r parameters
    assert n == sum(a.site.out_features * a.method.rank for a in case.adapted.plan)


def test_only_the_block_affine_mode_is_claimed():
    # MiSS's default (shard-sharing) and mini modes are other maths than Bone's
    assert method_for_config({"peft_type": "MISS", "init_weights": "bat"}) is Bone
    assert not claims(Bone, {"peft_type": "MISS", "init_weights": True})
    assert not claims(Bone, {"peft_type": "MISS", "init_weights": "mini"})


def test_block_size_that_does_not_divide_is_refused_as_peft_does(llama):
    spec = load_spec(
        {"adapters": [{"method": "bone", "targets": ["q_proj"], "rank": 24}]}, methods()
    )
    with pytest.raises(SpecError, match="block size rank=24 does not divide in_features 64"):
        resolve(spec, llama.adapted.sites, methods())
    config = MissConfig(r=24, init_weights="bat", target_modules=["q_proj"])
    with pytest.raises(ValueError, match=r"fully divisible into \[r, r\] blocks"):
        get_peft_model(copy.deepcopy(llama.base), config)


@pytest.mark.parametrize("rank", [0, -4, 2.5, True])
def test_bad_block_size_is_refused(rank):
    spec = {"adapters": [{"method": "bone", "targets": ["q_proj"], "rank": rank}]}
    with pytest.raises(SpecError, match=r"rank \(the block size\) must be a positive integer"):
        load_spec(spec, methods())


def test_unsupported_sites_are_refused(llama):
    spec = load_spec(
        {"adapters": [{"method": "bone", "targets": ["embed_tokens"], "rank": 16}]}, methods()
    )
    with pytest.raises(SpecError, match="bone supports linear layers only"):
        resolve(spec, llama.adapted.sites, methods())


def test_block_affine_update_interacts_with_the_weight(llama):
    """ΔW = W·B + B per block: doubling W changes ΔW (unlike LoRA-style updates)."""
    a = llama.adapted.plan.assignments[0]
    state = llama.adapted.state()
    W = state[a.site.weight].detach()
    p = {"miss_block": state[f"adapters.{a.path}.miss_block"].detach()}
    delta = a.method.merged_weight(a.site, W, p) - W
    delta2 = a.method.merged_weight(a.site, 2 * W, p) - 2 * W
    r = a.method.rank
    blocks = W.reshape(W.shape[0] // r, r, W.shape[1] // r, r)
    expected = torch.einsum("iajb,ibc->iajc", blocks, p["miss_block"]) + p["miss_block"][:, :, None]
    torch.testing.assert_close(delta, expected.reshape(W.shape), atol=1e-6, rtol=1e-6)
    assert (delta2 - delta).abs().max() > 1e-3
