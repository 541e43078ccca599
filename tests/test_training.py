"""Training behaviour: identity at init, gradients only on adapters, frozen base, checkpoints."""

import pytest
import torch

import peftc
from tests.models import perturb, restored, tiny_llama, token_inputs

SPEC = {
    "adapters": [
        {
            "method": "lora",
            "targets": ["*.q_proj", "*.v_proj", "*.down_proj"],
            "rank": 4,
            "alpha": 8,
            "overrides": {"*.layers.0.*": {"rank": 8}},
        }
    ]
}


@pytest.fixture(scope="module")
def compiled():
    """tiny Llama and its adapted model at init, compiled once for this file."""
    base = tiny_llama()
    return base, peftc.compile(base, SPEC, token_inputs())


@pytest.fixture
def adapted(compiled):
    """The module's adapted model; what a test changes on it is put back."""
    with restored(compiled[1]) as model:
        yield model


def test_output_equals_base_at_init(compiled, adapted):
    base, _ = compiled
    x = token_inputs(3, 11, seed=7)
    with torch.no_grad():
        assert torch.equal(adapted.eval()(**x).logits, base(**x).logits)


def test_overrides_set_per_site_rank(adapted):
    ranks = {a.path: a.rank for a in adapted.plan}
    assert ranks["model.layers.0.self_attn.q_proj"] == 8
    assert ranks["model.layers.1.self_attn.q_proj"] == 4
    assert adapted.named_adapter_parameters()[
        "adapters.model.layers.0.mlp.down_proj.lora_A"
    ].shape == (8, 96)


def test_only_adapters_get_gradients_and_base_stays_bit_identical(compiled, adapted):
    base, _ = compiled
    before = {n: p.detach().clone() for n, p in base.named_parameters()}
    adapted.train()
    opt = torch.optim.AdamW(adapted.trainable_parameters(), lr=1e-2)
    x = token_inputs()
    for _ in range(2):
        loss = adapted(**x).logits.logsumexp(-1).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
    loss = adapted(**x).logits.logsumexp(-1).mean()
    loss.backward()
    with_grad = {n for n, p in adapted.named_parameters() if p.grad is not None}
    assert with_grad == set(adapted.named_adapter_parameters())
    assert len(with_grad) == 12
    for n, p in base.named_parameters():
        assert torch.equal(p, before[n]), n
        assert not p.requires_grad


def test_save_then_load_round_trips(adapted, tmp_path):
    perturb(adapted.trainable_parameters())
    adapted.save_adapter(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    saved = {n: p.detach().clone() for n, p in adapted.named_adapter_parameters().items()}
    perturb(adapted.trainable_parameters(), seed=5)  # other values, then the load
    assert not all(torch.equal(p, saved[n]) for n, p in adapted.named_adapter_parameters().items())
    adapted.load_adapter(tmp_path)
    for n, p in adapted.named_adapter_parameters().items():
        assert torch.equal(p, saved[n]), n


def test_loading_an_adapter_for_another_plan_is_refused(compiled, adapted, tmp_path):
    base, _ = compiled
    adapted.save_adapter(tmp_path)
    other = peftc.compile(
        base, {"adapters": [{"method": "lora", "targets": ["*.k_proj"], "rank": 4}]}, token_inputs()
    )
    with pytest.raises(
        ValueError,
        match=r"does not fit this model's plan: missing \['base_model.model.model.layers.0.self_attn.k_proj",
    ):
        other.load_adapter(tmp_path)


def test_debug_prints_a_diff_per_pass(compiled, capsys):
    base, _ = compiled
    peftc.compile(base, SPEC, token_inputs(), debug=True)
    err = capsys.readouterr().err
    assert "[peftc] pass insert_adapters" in err
    assert "rule insert_adapter: 6 matches" in err and "'not targeted by the spec': 10" in err
    assert "+    linear_" in err  # the inserted adapter matmuls appear in the diff
