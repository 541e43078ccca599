"""RandLoRA against Hugging Face PEFT (RandLoraConfig), fp32, 1e-5: tiny Llama and GPT-2."""

import pytest
import torch
from peft import RandLoraConfig, get_peft_model
from safetensors import safe_open

from passes.adapters.base import bind_plan
from passes.adapters.randlora import RandLoRA
from passes.adapters.registry import methods
from peftc.peft_format import read_config, spec_from_peft
from rewrite.sites import Site
from rewrite.spec import Assignment, SpecError, load_spec, resolve
from tests import method_checks as mc

# GPT-2's both orientations: in < out (c_attn) and in > out (mlp.c_proj)
TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "gpt2": ["c_attn", "c_proj"]}
RANK, ALPHA = 8, 16


@pytest.fixture
def llama(method_model, tmp_path):
    """The shared randlora model (tests/method_cases.py): tiny Llama, rank 4."""
    return mc.shared_case(method_model("randlora")), tmp_path


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    """peftc.from_peft of a sparse-bases checkpoint without the bases (save_projection=False):
    peftc rebuilds them from the PRNG key, as PEFT does."""
    directory = tmp_path_factory.mktemp("randlora_gpt2")
    config = RandLoraConfig(
        r=RANK,
        randlora_alpha=ALPHA,
        target_modules=TARGETS["gpt2"],
        save_projection=False,
        sparse=True,
    )
    case = mc.from_peft_case("gpt2", config, directory / "peft", std=0.2)
    assert not any("randlora_A" in k for k in checkpoint_keys(directory / "peft"))
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
    registry, sites = methods(), case.adapted.sites
    spec = load_spec(spec_from_peft(read_config(directory / "peft"), sites), registry)
    again = bind_plan(resolve(spec, sites, registry))
    assert [(a.path, a.method) for a in again] == [(a.path, a.method) for a in case.adapted.plan]


def test_shared_bases_are_stored_once(case):
    case, _ = case
    params = case.adapted.named_adapter_parameters()
    assert [n for n in params if n.endswith(("randlora_A", "randlora_B"))] == [
        "adapters.shared.randlora.randlora_A",
        "adapters.shared.randlora.randlora_B",
    ]
    A = params["adapters.shared.randlora.randlora_A"]
    B = params["adapters.shared.randlora.randlora_B"]
    torch.testing.assert_close(A, case.peft.base_model.randlora_A["default"], atol=0, rtol=0)
    torch.testing.assert_close(B, case.peft.base_model.randlora_B["default"], atol=0, rtol=0)
    assert not A.requires_grad and not B.requires_grad


def test_merge_matches_peft(gpt2):
    mc.assert_merge_matches(gpt2[0])


def test_costs_match_peft(case):
    n = mc.assert_costs_match(case[0])
    # λ [r, n] + γ [n, min] per layer, n = ceil(min / r)
    expected = 0
    for a in case[0].adapted.plan:
        m = min(a.site.in_features, a.site.out_features)
        r = a.method.rank
        nb = -(-m // r)
        expected += r * nb + nb * m
    assert n == expected


def test_only_lambda_and_gamma_train(llama):
    declared = mc.declared_trainable(llama[0].adapted)
    assert declared and all(n.endswith(("randlora_lambda", "randlora_gamma")) for n in declared)


def test_peftc_checkpoint_loads_into_peft(case):
    case, directory = case
    config = mc.assert_peftc_to_peft(case, directory / "ours", std=0.2)
    keys = set(checkpoint_keys(directory / "ours"))
    if config["save_projection"]:  # written as PEFT writes them: globally and per layer
        assert "base_model.randlora_A" in keys
        assert {f"base_model.model.{a.path}.randlora_B" for a in case.adapted.plan} <= keys
    else:
        assert case.arch == "gpt2" and config["sparse"]
        assert not any("randlora_A" in k for k in keys)


@pytest.mark.parametrize("kind", ["dense", "sparse", "very_sparse"])
def test_bases_from_the_prng_key_equal_peft(kind):
    """The three kinds of shared bases, drawn from the key as PEFT draws them (no checkpoint)."""
    model = torch.nn.Sequential(torch.nn.Linear(20, 12), torch.nn.ReLU(), torch.nn.Linear(12, 30))
    flags = {"sparse": kind == "sparse", "very_sparse": kind == "very_sparse"}
    config = RandLoraConfig(r=4, target_modules=["0", "2"], projection_prng_key=7, **flags)
    peft_model = get_peft_model(model, config)
    method = RandLoRA(
        rank=4, projection_prng_key=7, max_in_features=20, max_out_features=30, **flags
    )
    site = fake_site("0", 20, 12)
    values = method.init(site, torch.zeros(12, 20), None, torch.Generator())
    # [max(30, 20), ceil(min(30, 20) / r), r]: largest out 30, largest in 20 over both layers
    assert values["randlora_B"].shape == (30, 5, 4)
    torch.testing.assert_close(values["randlora_A"], peft_model.base_model.randlora_A["default"])
    torch.testing.assert_close(values["randlora_B"], peft_model.base_model.randlora_B["default"])


@pytest.mark.parametrize(
    "params, message",
    [
        ({"rank": 0}, "rank must be a positive integer"),
        ({"alpha": -1}, "alpha must be a positive number"),
        ({"dropout": -0.1}, r"dropout must be in \[0, 1\)"),
        ({"projection_prng_key": 1.5}, "projection_prng_key must be a non-negative integer"),
        ({"sparse": 1}, "sparse must be true or false"),
        ({"max_out_features": -3}, "max_out_features must be a positive integer"),
    ],
)
def test_bad_hyperparameters_are_refused(params, message):
    with pytest.raises(ValueError, match=message):
        RandLoRA(**params)


def fake_site(path: str, n_in: int, n_out: int, op: str = "linear") -> Site:
    shape = (n_in, n_out) if op in ("addmm", "embedding") else (n_out, n_in)
    return Site(
        path, op, path, None, n_in, n_out, f"{path}.weight", shape, torch.float32, False, ""
    )


def test_sites_must_agree_on_the_shared_bases():
    plan = [
        Assignment(fake_site("a", 8, 16), RandLoRA(rank=4), 0),
        Assignment(fake_site("b", 32, 8), RandLoRA(rank=4, sparse=True), 0),
    ]
    with pytest.raises(SpecError, match="sparse must be the same at every randlora site"):
        bind_plan(plan)
    plan[1] = Assignment(plan[1].site, RandLoRA(rank=4, alpha=3.0), 0)
    bound = bind_plan(plan)
    shapes = {tuple(a.method.params(a.site)["randlora_B"].shape) for a in bound}
    assert shapes == {(32, 4, 4)}  # max(32, 16) rows, ceil(min(16, 32) / 4) bases
    assert "conv2d" in RandLoRA().check(fake_site("c", 8, 8, op="conv2d"))
