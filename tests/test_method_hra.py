"""HRA against Hugging Face PEFT (HRAConfig), fp32, 1e-5: tiny Llama, MiniLM (BERT) and a
conv net (PEFT's HRA adapts nn.Linear and nn.Conv2d; GPT-2's Conv1D is not among them)."""

import copy

import pytest
import torch
from peft import HRAConfig, PeftModel, get_peft_model

import peftc
from passes.adapters.hra import HRA
from passes.adapters.registry import methods
from passes.merge import merged_weights
from peftc.peft_format import read_config, spec_from_peft
from rewrite.sites import ConvGeometry, Site
from rewrite.spec import load_spec, resolve
from tests import method_checks as mc
from tests.models import convnet, image_inputs, perturb

TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "minilm": ["query", "value"]}
RANK = 4


@pytest.fixture
def llama(method_model, tmp_path):
    """The shared hra model (tests/method_cases.py): tiny Llama, rank 4, the symmetric init."""
    return mc.shared_case(method_model("hra")), tmp_path


@pytest.fixture(scope="module")
def minilm(tmp_path_factory):
    """peftc.from_peft of a Gram-Schmidt (apply_GS) checkpoint on real BERT weights."""
    directory = tmp_path_factory.mktemp("hra_minilm")
    config = HRAConfig(r=RANK, target_modules=TARGETS["minilm"], apply_GS=True)
    return mc.from_peft_case("minilm", config, directory / "peft", std=0.3), directory


@pytest.fixture(params=list(TARGETS))
def case(request):
    return request.getfixturevalue(request.param)


def test_peft_checkpoint_loads_into_peftc(minilm):
    case, directory = minilm
    mc.assert_peft_parity(case)
    registry, sites = methods(), case.adapted.sites
    spec = load_spec(spec_from_peft(read_config(directory / "peft"), sites), registry)
    again = resolve(spec, sites, registry)
    assert [(a.path, a.method) for a in again] == [(a.path, a.method) for a in case.adapted.plan]


def test_merge_matches_peft(minilm):
    mc.assert_merge_matches(minilm[0])


def test_merged_weight_is_an_orthogonal_map_of_the_base(case):
    """HRA only rotates/reflects W's rows: W H Hᵀ Wᵀ == W Wᵀ."""
    adapted = case[0].adapted
    merged = merged_weights(adapted.plan.assignments, adapted.state())
    for a in adapted.plan:
        W, M = case[0].base.get_submodule(a.path).weight, merged[a.path]
        torch.testing.assert_close(M @ M.t(), W @ W.t(), atol=1e-5, rtol=1e-5)


def test_costs_match_peft(case):
    n = mc.assert_costs_match(case[0])
    assert n == sum(RANK * a.site.in_features for a in case[0].adapted.plan)


def test_only_u_trains(llama):
    declared = mc.declared_trainable(llama[0].adapted)
    assert declared and all(n.endswith("hra_u") for n in declared)


def test_peftc_checkpoint_loads_into_peft(case):
    case, directory = case
    config = mc.assert_peftc_to_peft(case, directory / "ours", std=0.3)
    assert config["apply_GS"] == (case.arch == "minilm")


def test_conv2d_parity_and_merge_with_peft(tmp_path):
    """PEFT's HRAConv2d on 3x3 (padded, strided) and 1x1 convolutions, both directions."""
    base = convnet()
    config = HRAConfig(r=RANK, target_modules=["conv1", "conv2", "conv3", "head"])
    peft_model = get_peft_model(copy.deepcopy(base), config)
    perturb(mc.peft_trainable(peft_model), std=0.3, seed=3)
    peft_model.eval().save_pretrained(tmp_path / "peft")
    adapted = peftc.from_peft(base, tmp_path / "peft", image_inputs(2)).eval()
    assert {a.site.op for a in adapted.plan} == {"conv2d", "linear"}
    x = image_inputs(3, seed=5)
    with torch.no_grad():
        expected, ours, plain = peft_model(*x), adapted(*x), base(*x)
        merged = adapted.merge()(*x)
    assert (expected - plain).abs().max() > 1e-3
    torch.testing.assert_close(ours, expected, atol=mc.TOL, rtol=mc.TOL)
    torch.testing.assert_close(merged, ours, atol=mc.TOL, rtol=mc.TOL)
    theirs = copy.deepcopy(peft_model).merge_and_unload()
    weights = merged_weights(adapted.plan.assignments, adapted.state())
    for a in adapted.plan:
        torch.testing.assert_close(
            weights[a.path], theirs.get_submodule(a.path).weight, atol=mc.TOL, rtol=mc.TOL
        )
    perturb(adapted.trainable_parameters(), std=0.3, seed=11)
    adapted.save_adapter(tmp_path / "ours")
    again = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    with torch.no_grad():
        torch.testing.assert_close(again(*x), adapted(*x), atol=mc.TOL, rtol=mc.TOL)


@pytest.mark.parametrize(
    "params, message",
    [
        ({"rank": 0}, "rank must be a positive integer"),
        ({"rank": "4"}, "rank must be a positive integer"),
        ({"apply_GS": 1}, "apply_GS must be true or false"),
        ({"init_weights": None}, "init_weights must be true or false"),
    ],
)
def test_bad_hyperparameters_are_refused(params, message):
    with pytest.raises(ValueError, match=message):
        HRA(**params)


def conv_site(kernel=(3, 3), stride=(1, 1), padding=(1, 1), groups=1) -> Site:
    geometry = ConvGeometry(kernel, stride, padding, (1, 1), groups)
    shape = (8, 4 // groups, *kernel)
    return Site(
        "c", "conv2d", "c", None, 4, 8, "c.weight", shape, torch.float32, False, "", conv=geometry
    )


def test_sites_hra_cannot_adapt_are_refused():
    assert HRA().check(conv_site()) is None
    assert "groups=1" in HRA().check(conv_site(groups=2))
    assert "square kernels" in HRA().check(conv_site(kernel=(3, 1)))
    assert "square kernels" in HRA().check(conv_site(stride=(2, 1)))
    assert "Gram-Schmidt" in HRA(rank=40, apply_GS=True).check(conv_site())  # fan-in 36
    linear = Site("l", "addmm", "l", None, 4, 8, "l.weight", (4, 8), torch.float32, False, "")
    assert "not addmm sites" in HRA().check(linear)
