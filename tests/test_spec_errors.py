"""Bad specs and inputs are refused with messages that name the problem and the fix."""

import pytest
import torch

import peftc
from passes.adapters.registry import methods
from rewrite.spec import SpecError, load_spec
from tests.models import tiny_llama, token_inputs


@pytest.fixture(scope="module")
def llama():
    return tiny_llama()


def lora(**kw):
    return {"adapters": [{"method": "lora", "targets": ["*.q_proj"], **kw}]}


BAD_SPECS = [
    (
        {"adapters": [{"method": "lorra", "targets": ["*.q_proj"]}]},
        r"unknown method 'lorra' \(did you mean 'lora'\?\); known methods: .*lora",
    ),
    (lora(rnak=4), r"unknown key 'rnak'; did you mean 'rank'\?"),
    ({"adapter": []}, r"unknown spec key 'adapter'; did you mean 'adapters'\?"),
    ({"adapters": []}, r"needs a non-empty 'adapters' list"),
    (lora(rank=0), r"rank must be a positive integer, got 0"),
    (lora(rank=-3), r"rank must be a positive integer, got -3"),
    (lora(dropout=1.5), r"dropout must be in \[0, 1\), got 1.5"),
    (lora(alpha=0), r"alpha must be a positive number"),
    (lora(init_weights="xavier"), r"init_weights must be one of \('kaiming', 'gaussian'\)"),
    ({"adapters": [{"method": "lora", "rank": 4}]}, r"selects no modules: give 'targets'"),
    (lora(layers="5-2"), r"layers range '5-2' is empty"),
    (lora(layers="a-b"), r"layers 'a-b' is not a range list"),
    (lora(targets=3), r"targets must be a string or a list of strings"),
    (
        lora(overrides={"*.layers.0.*": {"rnk": 16}}),
        r"overrides\['\*.layers.0.\*'\] has unknown key 'rnk'; did you mean 'rank'\?",
    ),
    (lora(overrides={"*.layers.0.*": {"rank": 0}}), r"overrides.*rank must be a positive integer"),
    ({"adapters": [{"targets": ["x"]}]}, r"has no 'method'; known methods: "),
    (
        {"adapters": [{"method": "lora", "targets": ["x"]}], "seed": "one"},
        r"seed must be an integer",
    ),
    ("adapters: [", r"not valid YAML"),
]


@pytest.mark.parametrize("spec,message", BAD_SPECS)
def test_bad_spec_is_refused_with_a_clear_message(spec, message):
    with pytest.raises(SpecError, match=message):
        load_spec(spec, methods())


def test_targets_matching_nothing_list_the_module_types(llama):
    with pytest.raises(SpecError) as e:
        peftc.compile(
            llama, {"adapters": [{"method": "lora", "targets": ["*.qproj"]}]}, token_inputs()
        )
    text = str(e.value)
    assert "matches no module" in text
    assert "self_attn.q_proj" in text and "mlp.down_proj" in text


def test_rank_larger_than_the_layer_is_refused(llama):
    spec = {"adapters": [{"method": "lora", "targets": ["*.k_proj"], "rank": 40}]}
    with pytest.raises(
        SpecError,
        match=r"k_proj: rank 40 is larger than the layer allows \(min\(in=64, out=32\) = 32\)",
    ):
        peftc.compile(llama, spec, token_inputs())


def test_spec_file_that_does_not_exist(tmp_path):
    with pytest.raises(SpecError, match="does not exist"):
        load_spec(str(tmp_path / "nope.yaml"), methods())


@pytest.fixture(scope="module")
def adapted(llama):
    return peftc.compile(llama, lora(rank=2), token_inputs())


def test_unknown_input_name_is_refused(adapted):
    with pytest.raises(TypeError, match=r"compiled for inputs \['input_ids', 'attention_mask'\]"):
        adapted(input_ids=token_inputs()["input_ids"])


def test_wrong_rank_input_is_refused(adapted):
    bad = {
        "input_ids": torch.zeros(2, 3, 4, dtype=torch.long),
        "attention_mask": torch.ones(2, 3, dtype=torch.long),
    }
    with pytest.raises(
        ValueError, match=r"input 'input_ids' has shape \(2, 3, 4\), expected \*x\*"
    ):
        adapted(**bad)


def test_example_inputs_with_batch_one_are_refused_with_a_fix(llama):
    with pytest.raises(peftc.TraceError, match=r"Trace with batch >= 2"):
        peftc.compile(llama, lora(rank=2), token_inputs(1, 8))


def test_non_tensor_example_input_is_refused(llama):
    with pytest.raises(
        TypeError, match=r"input 'input_ids' is a list; peftc traces tensor inputs only"
    ):
        peftc.compile(llama, lora(rank=2), {"input_ids": [[1, 2]]})


class DataDependent(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(4, 4)

    def forward(self, x):
        if x.sum() > 0:  # branches on tensor data: not traceable
            return self.proj(x)
        return x


def test_untraceable_model_names_the_line_and_a_fix():
    with pytest.raises(peftc.TraceError) as e:
        peftc.compile(DataDependent(), lora(rank=2), (torch.randn(2, 4),))
    text = str(e.value)
    assert "could not trace DataDependent" in text
    assert "test_spec_errors.py" in text and "if x.sum() > 0" in text
    assert "torch.where/torch.cond" in text
