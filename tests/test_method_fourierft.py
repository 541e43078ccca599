"""FourierFT against Hugging Face PEFT (FourierFTConfig), fp32, 1e-5: tiny Llama and GPT-2."""

import pytest
import torch
from peft import FourierFTConfig

from passes.adapters.fourierft import FourierFT
from passes.adapters.registry import methods
from peftc.peft_format import read_config, spec_from_peft
from rewrite.spec import SpecError, load_spec, resolve
from tests import method_checks as mc

TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "gpt2": ["c_attn", "c_fc"]}
N, SCALING, SEED = 40, 20.0, 5
PATTERN = {"llama": {"v_proj": 24}, "gpt2": {"transformer.h.1.mlp.c_fc": 16}}


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """Compiled from a spec with a per-layer override (PEFT's n_frequency_pattern), then PEFT's
    checkpoint of the same config is loaded into it: one trace."""
    directory = tmp_path_factory.mktemp("fourierft_llama")
    rule = {
        "method": "fourierft",
        "targets": TARGETS["llama"],
        "n_frequency": N,
        "scaling": SCALING,
        "random_loc_seed": SEED,
        "init_weights": True,
        "overrides": {"*.v_proj": {"n_frequency": 24}},
    }
    config = FourierFTConfig(
        n_frequency=N,
        scaling=SCALING,
        random_loc_seed=SEED,
        init_weights=True,
        target_modules=TARGETS["llama"],
        n_frequency_pattern=PATTERN["llama"],
    )
    case = mc.compiled_case("llama", {"adapters": [rule]}, config, directory / "peft", std=0.5)
    return case, directory


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    """peftc.from_peft of a checkpoint with PEFT's defaults (Gaussian coefficients)."""
    directory = tmp_path_factory.mktemp("fourierft_gpt2")
    config = FourierFTConfig(
        n_frequency=N,
        scaling=SCALING,
        target_modules=TARGETS["gpt2"],
        n_frequency_pattern=PATTERN["gpt2"],
    )
    return mc.from_peft_case("gpt2", config, directory / "peft", std=0.5), directory


@pytest.fixture(params=list(TARGETS))
def case(request):
    return request.getfixturevalue(request.param)


def test_peft_checkpoint_loads_into_peftc(case):
    case, directory = case
    mc.assert_peft_parity(case)
    registry, sites = methods(), case.adapted.sites
    spec = load_spec(spec_from_peft(read_config(directory / "peft"), sites), registry)
    again = resolve(spec, sites, registry)
    assert [(a.path, a.method) for a in again] == [(a.path, a.method) for a in case.adapted.plan]
    n = {a.path: a.method.n_frequency for a in case.adapted.plan}
    assert sorted(set(n.values())) == sorted({N, *PATTERN[case.arch].values()})


def test_frequency_locations_are_peft_s(case):
    """Same seed, same locations: the frozen index tensor equals PEFT's, per layer."""
    case, _ = case
    state = case.adapted.named_adapter_parameters()
    for a in case.adapted.plan:
        theirs = case.peft.base_model.model.get_submodule(a.path).indices["default"]
        ours = state[f"adapters.{a.path}.indices"]
        assert ours.dtype == torch.int64 and not ours.requires_grad
        assert torch.equal(ours, theirs)


def test_merge_matches_peft(case):
    mc.assert_merge_matches(case[0])


def test_costs_match_peft(case):
    n = mc.assert_costs_match(case[0])
    assert n == sum(a.method.n_frequency for a in case[0].adapted.plan)


def test_only_the_spectrum_trains(llama):
    declared = mc.declared_trainable(llama[0].adapted)
    assert declared and all(n.endswith("fourierft_spectrum") for n in declared)


def test_peftc_checkpoint_loads_into_peft(case):
    case, directory = case
    config = mc.assert_peftc_to_peft(case, directory / "ours", std=0.5)
    assert config["random_loc_seed"] == case.adapted.plan.assignments[0].method.random_loc_seed
    assert sorted(config["n_frequency_pattern"].values()) == sorted(
        a.method.n_frequency for a in case.adapted.plan if a.method.n_frequency != N
    )


def test_n_frequency_above_in_times_out_is_refused(llama):
    """A 64x64 q_proj holds 4096 spectral entries; PEFT refuses more, and so does peftc."""
    spec = {"adapters": [{"method": "fourierft", "targets": ["q_proj"], "n_frequency": 4097}]}
    registry, sites = methods(), llama[0].adapted.sites
    with pytest.raises(SpecError, match=r"n_frequency 4097 is more than .* 64·64 = 4096"):
        resolve(load_spec(spec, registry), sites, registry)
    fits = {"adapters": [{"method": "fourierft", "targets": ["q_proj"], "n_frequency": 4096}]}
    assert len(resolve(load_spec(fits, registry), sites, registry)) == 2


@pytest.mark.parametrize(
    "params, message",
    [
        ({"n_frequency": 0}, "n_frequency must be a positive integer"),
        ({"n_frequency": 2.5}, "n_frequency must be a positive integer"),
        ({"scaling": 0}, "scaling must be a finite non-zero number"),
        ({"scaling": float("inf")}, "scaling must be a finite non-zero number"),
        ({"random_loc_seed": None}, "random_loc_seed must be a non-negative integer"),
        ({"init_weights": "no"}, "init_weights must be true or false"),
    ],
)
def test_bad_hyperparameters_are_refused(params, message):
    with pytest.raises(ValueError, match=message):
        FourierFT(**params)
