"""`targets: all-linear` adapts the modules PEFT's `target_modules="all-linear"` adapts: every
linear-like layer (GPT-2's Conv1D included) but the model's output embeddings, whatever the
head is called."""

import copy

import pytest
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer

import peftc
from rewrite.spec import SpecError
from tests.models import tiny_bert, tiny_gpt2, tiny_llama, token_inputs


def peft_paths(model) -> list[str]:
    """The module paths PEFT puts a LoRA layer on for target_modules="all-linear"."""
    adapted = get_peft_model(copy.deepcopy(model), LoraConfig(r=2, target_modules="all-linear"))
    prefix = "base_model.model."
    return sorted(
        name[len(prefix) :] for name, m in adapted.named_modules() if isinstance(m, LoraLayer)
    )


@pytest.mark.parametrize(
    ("build", "head"),
    [
        (tiny_llama, "lm_head"),
        (tiny_gpt2, "lm_head"),
        (lambda: tiny_bert(layers=1, masked_lm=True), "cls.predictions.decoder"),
    ],
)
def test_all_linear_adapts_what_peft_adapts(build, head):
    model = build()
    expected = peft_paths(model)
    adapted = peftc.compile(
        model,
        {"adapters": [{"method": "lora", "targets": "all-linear", "rank": 2}]},
        token_inputs(),
    )
    paths = sorted(a.path for a in adapted.plan)
    assert paths == expected
    assert head in {s.path for s in adapted.sites} and head not in paths
    assert adapted.sites[head].output_head


def test_all_linear_in_a_list_and_next_to_globs():
    model = tiny_llama(layers=1)
    spec = {
        "adapters": [
            {"method": "dora", "targets": ["*.q_proj"], "rank": 2},
            {"method": "lora", "targets": ["all-linear", "lm_head"], "rank": 2},
        ]
    }
    adapted = peftc.compile(model, spec, token_inputs())
    methods = {a.path: a.method.name for a in adapted.plan}
    assert methods.pop("model.layers.0.self_attn.q_proj") == "dora"  # the first rule wins
    assert methods.pop("lm_head") == "lora"  # named, so adapted next to all-linear
    assert sorted(methods) == [p for p in peft_paths(model) if not p.endswith("q_proj")]
    assert set(methods.values()) == {"lora"}


def test_a_model_without_linear_layers_says_what_it_has():
    import torch

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU())
    spec = {"adapters": [{"method": "lora", "targets": "all-linear"}]}
    with pytest.raises(SpecError, match="matches no module.*'all-linear'"):
        peftc.compile(model, spec, (torch.randn(2, 3, 8, 8),))
