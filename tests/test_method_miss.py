"""MiSS (shard sharing) against PEFT's MissConfig default form (init_weights=True) and its mini
form, on tiny Llama and MiniLM (BERT), fp32, 1e-5. The block-affine "bat" form is bone's."""

import copy

import pytest
import torch
from peft import MissConfig, get_peft_model

import peftc
from passes.adapters.bone import Bone
from passes.adapters.miss import MiSS
from passes.adapters.registry import methods
from peftc.peft_format import claims, hyperparams_from_peft, method_for_config
from rewrite.spec import SpecError, load_spec, resolve
from tests.method_checks import (
    Case,
    assert_costs_match,
    assert_gradients_reach_declared,
    assert_identity_at_init,
    assert_merge_matches,
    assert_peft_parity,
    assert_peftc_to_peft,
    compiled_case,
    example_inputs,
    from_peft_case,
)

STD = 0.05
LLAMA = ["q_proj", "v_proj", "down_proj"]  # 64->64, 64->32, 96->64
MINILM = ["query", "value", "intermediate.dense"]  # 384->384 and 384->1536


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """Default form with r=12, which divides 96 but not 64: the zero-padded last shard."""
    spec = {"adapters": [{"method": "miss", "targets": LLAMA, "rank": 12}]}
    config = MissConfig(r=12, target_modules=LLAMA)
    return compiled_case("llama", spec, config, tmp_path_factory.mktemp("peft"), STD)


@pytest.fixture(scope="module")
def mini_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("peft")


@pytest.fixture(scope="module")
def mini(mini_dir):
    """Mini form: an [8, 16] block tiled along out_features 64 and 32 (PEFT's checkpoint in
    mini_dir)."""
    spec = {"adapters": [{"method": "miss", "targets": LLAMA, "rank": 8, "mini_r": 16}]}
    config = MissConfig(r=8, init_weights="mini", mini_r=16, target_modules=LLAMA)
    return compiled_case("llama", spec, config, mini_dir, STD)


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    """The issue's checkpoint: MissConfig(r=8, target_modules=...), every other option PEFT's."""
    config = MissConfig(r=8, target_modules=MINILM)
    return from_peft_case("minilm", config, tmp_path_factory.mktemp("peft"), STD)


@pytest.fixture(params=["llama", "mini", "bert"])
def case(request):
    return request.getfixturevalue(request.param)


@pytest.fixture(params=["llama", "mini"])
def compiled(request):
    return request.getfixturevalue(request.param)


def test_peft_checkpoint_loads_into_peftc(case):
    assert_peft_parity(case)


def test_from_peft_reads_the_default_form(bert):
    assert {a.method for a in bert.adapted.plan} == {MiSS(rank=8)}


def test_from_peft_reads_the_mini_form(mini, mini_dir):
    adapted = peftc.from_peft(mini.base, mini_dir, example_inputs("llama")).eval()
    assert {a.method for a in adapted.plan} == {MiSS(rank=8, mini_r=16)}
    assert_peft_parity(Case("llama", mini.base, mini.peft, adapted))


def test_peftc_checkpoint_loads_into_peft(case, tmp_path):
    config = assert_peftc_to_peft(case, tmp_path, STD)
    method = case.adapted.plan.assignments[0].method
    form = ("mini", 16) if method.mini_r else (True, 1)
    assert (config["peft_type"], config["init_weights"], config["mini_r"]) == ("MISS", *form)
    assert MiSS(**hyperparams_from_peft(MiSS, config)) == method  # the config reads back


def test_identity_at_init(compiled):
    assert_identity_at_init(compiled)


def test_merge_matches_peft(case):
    assert_merge_matches(case)


def test_gradients_reach_exactly_the_blocks(compiled):
    assert_gradients_reach_declared(compiled)


def test_costs_match_peft(case):
    n = assert_costs_match(case)
    # one [r, out] block per site, or [r, mini_r] in the mini form
    expected = sum(
        a.method.rank * (a.method.mini_r or a.site.out_features) for a in case.adapted.plan
    )
    assert n == expected


@pytest.mark.parametrize(
    "config,expected",
    [
        ({"peft_type": "MISS"}, MiSS()),  # PEFT's defaults: r=64, init_weights=True
        ({"peft_type": "MISS", "r": 8, "init_weights": True, "mini_r": 4}, MiSS(rank=8)),
        (
            {"peft_type": "MISS", "r": 8, "init_weights": False, "miss_dropout": 0.1},
            MiSS(rank=8, dropout=0.1, init_weights=False),
        ),
        (
            {"peft_type": "MISS", "r": 8, "init_weights": "mini", "mini_r": 4},
            MiSS(rank=8, mini_r=4),
        ),
        ({"peft_type": "MISS", "r": 8, "init_weights": "bat"}, Bone(rank=8)),
    ],
)
def test_each_peft_miss_form_is_claimed_by_one_method(config, expected):
    cls = method_for_config(config)
    assert cls(**hyperparams_from_peft(cls, config)) == expected
    assert sum(claims(c, config) for c in methods().values()) == 1  # no overlap


def test_random_init_is_pefts_kaiming_uniform(llama):
    """init_weights false: Kaiming-uniform over [r, out] (fan-in out), bound 1/√out, as PEFT."""
    site = llama.adapted.plan.assignments[0].site
    ours = MiSS(rank=12, init_weights=False).init(
        site, torch.zeros(64, 64), None, torch.Generator().manual_seed(0)
    )["miss_block"]
    peft = get_peft_model(
        copy.deepcopy(llama.base), MissConfig(r=12, init_weights=False, target_modules=["q_proj"])
    )
    theirs = peft.base_model.model.model.layers[0].self_attn.q_proj.miss_block["default"]
    bound = 1 / 64**0.5
    for block in (ours, theirs.detach()):
        assert block.shape == (12, 64)
        assert 0.9 * bound < block.abs().max() <= bound


def test_update_is_the_shared_shard_repeated_and_ignores_w(compiled):
    """ΔW[o, j] = D[j mod r, o] (one r-wide shard repeated along in), in the mini form also
    periodic in o with period mini_r; unlike bone's, it does not depend on W."""
    state = compiled.adapted.state()
    # fp32, 1e-6: (W + ΔW) - W differs from ΔW by W's rounding only (|W| < 1 here)
    for a in compiled.adapted.plan:
        W = state[a.site.weight].detach()
        p = {"miss_block": state[f"adapters.{a.path}.miss_block"].detach()}
        delta = a.method.merged_weight(a.site, W, p) - W
        r, period = a.method.rank, a.method.mini_r or a.site.out_features
        cols = torch.arange(a.site.in_features) % r
        rows = torch.arange(a.site.out_features) % period
        torch.testing.assert_close(delta, p["miss_block"][cols][:, rows].t(), atol=1e-6, rtol=0)
        delta2 = a.method.merged_weight(a.site, 2 * W, p) - 2 * W
        torch.testing.assert_close(delta2, delta, atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "params,message",
    [
        ({"rank": 0}, r"rank \(the shard width\) must be a positive integer, got 0"),
        ({"rank": 2.5}, r"rank \(the shard width\) must be a positive integer"),
        ({"rank": True}, r"rank \(the shard width\) must be a positive integer"),
        ({"mini_r": 0}, r"mini_r must be null \(the default form\) or a positive integer"),
        ({"mini_r": 1.5}, r"mini_r must be null .* or a positive integer, got 1.5; .* mini form"),
        ({"dropout": 1.0}, r"dropout must be in \[0, 1\), got 1.0"),
        ({"init_weights": "mini"}, "init_weights must be true or false, got 'mini'; .* set mini_r"),
        ({"mini_r": 4, "init_weights": False}, r"PEFT's mini form always starts at zero"),
    ],
)
def test_bad_hyperparameters_are_refused(params, message):
    spec = {"adapters": [{"method": "miss", "targets": ["q_proj"], "rank": 8, **params}]}
    with pytest.raises(SpecError, match=message):
        load_spec(spec, methods())


@pytest.mark.parametrize(
    "params,ours,peft_says",
    [
        (
            {"rank": 128},
            "rank=128 is wider than in_features 64; .* pick r ≤ 64",
            r"must be less than or equal to in_features \(64\)",
        ),
        (
            {"rank": 8, "mini_r": 24},
            "mini_r=24 does not divide out_features 64; .* pick mini_r dividing 64",
            "mini_r is divided along the out_features dimension",
        ),
    ],
)
def test_layers_that_do_not_fit_are_refused_as_peft_does(llama, params, ours, peft_says):
    spec = load_spec({"adapters": [{"method": "miss", "targets": ["q_proj"], **params}]}, methods())
    with pytest.raises(SpecError, match=ours):
        resolve(spec, llama.adapted.sites, methods())
    mini = {"init_weights": "mini", "mini_r": params["mini_r"]} if "mini_r" in params else {}
    config = MissConfig(r=params["rank"], target_modules=["q_proj"], **mini)
    with pytest.raises(ValueError, match=peft_says):
        get_peft_model(copy.deepcopy(llama.base), config)


def test_unsupported_sites_are_refused(llama):
    spec = load_spec(
        {"adapters": [{"method": "miss", "targets": ["embed_tokens"], "rank": 8}]}, methods()
    )
    with pytest.raises(SpecError, match="miss supports linear layers only"):
        resolve(spec, llama.adapted.sites, methods())
