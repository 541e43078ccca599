"""VeRA against Hugging Face PEFT (VeraConfig), fp32, 1e-5: tiny Llama and GPT-2 (Conv1D)."""

import pytest
import torch
from peft import VeraConfig
from safetensors import safe_open

from passes.adapters.base import bind_plan
from passes.adapters.registry import methods
from passes.adapters.vera import VeRA
from peftc.peft_format import read_config, spec_from_peft
from rewrite.sites import Site
from rewrite.spec import Assignment, SpecError, load_spec, resolve
from tests import method_checks as mc

TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "gpt2": ["c_attn", "c_fc"]}
RANK = 4


@pytest.fixture
def llama(method_model, tmp_path):
    """The shared vera model (tests/method_cases.py): tiny Llama, rank 4, projections saved."""
    return mc.shared_case(method_model("vera")), tmp_path


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    """peftc.from_peft of a checkpoint without the projections (save_projection=False):
    peftc rebuilds them from the PRNG key, as PEFT does."""
    directory = tmp_path_factory.mktemp("vera_gpt2")
    config = VeraConfig(r=RANK, target_modules=TARGETS["gpt2"], save_projection=False)
    case = mc.from_peft_case("gpt2", config, directory / "peft", std=0.5)
    assert not any("vera_A" in k for k in checkpoint_keys(directory / "peft"))
    return case, directory


@pytest.fixture(params=list(TARGETS))
def case(request):
    return request.getfixturevalue(request.param)


def checkpoint_keys(directory) -> list[str]:
    with safe_open(str(directory / "adapter_model.safetensors"), "pt") as f:
        return list(f.keys())


def test_peft_checkpoint_loads_into_peftc(gpt2):
    case, directory = gpt2
    mc.assert_peft_parity(case)
    # from_peft's reading of PEFT's config gives this very plan
    registry, sites = methods(), case.adapted.sites
    spec = load_spec(spec_from_peft(read_config(directory / "peft"), sites), registry)
    again = bind_plan(resolve(spec, sites, registry))
    assert [(a.path, a.method) for a in again] == [(a.path, a.method) for a in case.adapted.plan]


def test_shared_projections_are_stored_once(case):
    case, _ = case
    params = case.adapted.named_adapter_parameters()
    assert [n for n in params if n.endswith(("vera_A", "vera_B"))] == [
        "adapters.shared.vera.vera_A",
        "adapters.shared.vera.vera_B",
    ]
    # sized by the largest adapted layer (PEFT's _find_dim), equal to PEFT's, and frozen
    A, B = params["adapters.shared.vera.vera_A"], params["adapters.shared.vera.vera_B"]
    torch.testing.assert_close(A, case.peft.base_model.vera_A["default"], atol=0, rtol=0)
    torch.testing.assert_close(B, case.peft.base_model.vera_B["default"], atol=0, rtol=0)
    assert not A.requires_grad and not B.requires_grad


def test_merge_matches_peft(gpt2):
    mc.assert_merge_matches(gpt2[0])


def test_costs_match_peft(case):
    n = mc.assert_costs_match(case[0])
    assert n == sum(a.method.rank + a.site.out_features for a in case[0].adapted.plan)


def test_only_d_and_b_train(llama):
    declared = mc.declared_trainable(llama[0].adapted)
    assert declared and all(n.endswith(("vera_lambda_d", "vera_lambda_b")) for n in declared)


def test_peftc_checkpoint_loads_into_peft(case):
    case, directory = case
    config = mc.assert_peftc_to_peft(case, directory / "ours", std=0.5)
    saved = case.adapted.plan.assignments[0].method.save_projection
    assert config["save_projection"] == saved
    assert ("base_model.vera_A" in checkpoint_keys(directory / "ours")) == saved


@pytest.mark.parametrize(
    "params, message",
    [
        ({"rank": 0}, "rank must be a positive integer"),
        ({"dropout": 1.0}, r"dropout must be in \[0, 1\)"),
        ({"d_initial": float("nan")}, "d_initial must be a finite number"),
        ({"projection_prng_key": -1}, "projection_prng_key must be a non-negative integer"),
        ({"save_projection": "yes"}, "save_projection must be true or false"),
        ({"max_in_features": 0}, "max_in_features must be a positive integer"),
    ],
)
def test_bad_hyperparameters_are_refused(params, message):
    with pytest.raises(ValueError, match=message):
        VeRA(**params)


def fake_site(path: str, n_in: int, n_out: int, op: str = "linear") -> Site:
    shape = (n_in, n_out) if op in ("addmm", "embedding") else (n_out, n_in)
    return Site(
        path, op, path, None, n_in, n_out, f"{path}.weight", shape, torch.float32, False, ""
    )


def test_sites_must_agree_on_the_shared_pair():
    plan = [
        Assignment(fake_site("a", 8, 16), VeRA(rank=4), 0),
        Assignment(fake_site("b", 32, 8), VeRA(rank=8), 0),
    ]
    with pytest.raises(SpecError, match="rank must be the same at every vera site"):
        bind_plan(plan)
    plan[1] = Assignment(plan[1].site, VeRA(rank=4, d_initial=0.5), 0)
    bound = bind_plan(plan)
    assert {(a.method.max_in_features, a.method.max_out_features) for a in bound} == {(32, 16)}
    assert bound[0].method.params(bound[0].site)["vera_A"].shape == (4, 32)
    assert bound[1].method.params(bound[1].site)["vera_B"].shape == (16, 4)
    assert "embedding" in VeRA().check(fake_site("e", 8, 8, op="embedding"))
    assert "exceed max_in_features" in VeRA(max_in_features=4).check(fake_site("s", 8, 8))
