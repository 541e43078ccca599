"""C3A (block-circular convolution) against PEFT's C3AConfig on tiny Llama and MiniLM (BERT),
fp32, 1e-5."""

import copy
import math

import pytest
import torch
from peft import C3AConfig, get_peft_model

from passes.adapters.c3a import C3A, circulant
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

STD = 1.0  # ΔW = C(w)/d_in: kernels of order 1 give a visible update
MINILM = ["query", "value", "intermediate.dense"]


@pytest.fixture
def llama(method_model):
    """The shared c3a model (tests/method_cases.py): block size 16, init_weights=zeros (PEFT's
    True), the init that is the identity."""
    return shared_case(method_model("c3a"))


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    config = C3AConfig(
        block_size=32,
        target_modules=MINILM,
        block_size_pattern={"intermediate.dense": 64, "encoder.layer.1.attention.self.query": 16},
    )
    return from_peft_case("minilm", config, tmp_path_factory.mktemp("peft"), STD)


@pytest.fixture(params=["llama", "bert"])
def case(request):
    return request.getfixturevalue(request.param)


def test_peft_checkpoint_loads_into_peftc(bert):
    assert_peft_parity(bert)


def test_block_size_pattern_becomes_overrides(bert):
    sizes = {a.path: a.method.block_size for a in bert.adapted.plan}
    assert sizes["encoder.layer.0.intermediate.dense"] == 64
    assert sizes["encoder.layer.1.attention.self.query"] == 16
    assert sizes["encoder.layer.0.attention.self.query"] == 32
    assert {a.method.init_weights for a in bert.adapted.plan} == {"xavier_uniform"}


def test_peftc_checkpoint_loads_into_peft(bert, tmp_path):
    config = assert_peftc_to_peft(bert, tmp_path, STD)
    assert config["peft_type"] == "C3A"


def test_default_init_is_peft_xavier_uniform_not_identity(llama):
    """PEFT's default C3A init is xavier-uniform (not the identity); peftc's is too."""
    site = llama.adapted.sites["model.layers.0.self_attn.q_proj"]
    W = llama.base.get_submodule(site.path).weight
    ours = C3A(block_size=16).init(site, W, None, torch.Generator().manual_seed(0))["c3a_kernel"]
    theirs = (
        get_peft_model(
            copy.deepcopy(llama.base), C3AConfig(block_size=16, target_modules=["q_proj"])
        )
        .base_model.model.model.layers[0]
        .self_attn.q_proj.c3a_kernel["default"]
    )
    bound = math.sqrt(3.0) * math.sqrt(2.0 / (site.in_features + site.out_features))
    for k in (ours, theirs):
        assert k.shape == (4, 4, 16)
        assert 0.9 * bound < k.abs().max() <= bound


def test_circulant_matches_the_fft_forward():
    """The dense matrix of the kernels applied to x equals the FFT convolution the forward uses."""
    w = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(0))
    x = torch.randn(5, 12, generator=torch.Generator().manual_seed(1))
    xb = x.unflatten(-1, (3, 4))
    fft_conv = torch.fft.fft(torch.einsum("tnb,mnb->tmb", torch.fft.ifft(xb), torch.fft.fft(w)))
    # block (m, n) is circulant in w[m, n]: y_i = Σ_j w[(j - i) mod b] x_j (PEFT's orientation)
    direct = torch.zeros(5, 2, 4)
    for m in range(2):
        for n in range(3):
            for i in range(4):
                for j in range(4):
                    direct[:, m, i] += w[m, n, (j - i) % 4] * xb[:, n, j]
    torch.testing.assert_close(fft_conv.real, direct, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x @ circulant(w).T, direct.flatten(1), atol=1e-5, rtol=1e-5)


def test_merge_matches_peft(bert):
    assert_merge_matches(bert)


def test_costs_match_peft(case):
    n = assert_costs_match(case)
    expected = sum(
        a.site.in_features * a.site.out_features // a.method.block_size for a in case.adapted.plan
    )
    assert n == expected


def test_block_size_that_does_not_divide_is_refused_as_peft_does(llama):
    spec = load_spec(
        {"adapters": [{"method": "c3a", "targets": ["v_proj"], "block_size": 64}]}, methods()
    )
    with pytest.raises(SpecError, match="block_size 64 does not divide out_features 32"):
        resolve(spec, llama.adapted.sites, methods())
    config = C3AConfig(block_size=64, target_modules=["v_proj"])
    with pytest.raises(ValueError, match="block size should be a factor of the output size"):
        get_peft_model(copy.deepcopy(llama.base), config)


@pytest.mark.parametrize(
    "hyper, message",
    [
        ({"block_size": 0}, "block_size must be a positive integer"),
        ({"block_size": 16, "init_weights": "orthogonal"}, "init_weights must be one of"),
    ],
)
def test_bad_hyperparameters_are_refused(hyper, message):
    with pytest.raises(SpecError, match=message):
        load_spec({"adapters": [{"method": "c3a", "targets": ["q_proj"], **hyper}]}, methods())
