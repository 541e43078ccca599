"""Every method on a bf16 model: compiled, run and merged against an fp32 twin holding the same
tensors. Tolerance (bf16, logits and updates of magnitude about 1): 5e-2, as for bf16
autocast in test_inductor."""

import pytest
import torch

import peftc
from passes.adapters.registry import methods
from tests.models import perturb, tiny_llama, token_inputs

BF16 = 5e-2
EXTRA = {"c3a": {"block_size": 16}, "fourierft": {"n_frequency": 64}}
NO_RANK = ("c3a", "fourierft")


def rule_for(name: str) -> dict:
    rule = {"method": name, "targets": ["q_proj", "v_proj", "down_proj"], **EXTRA.get(name, {})}
    if name not in NO_RANK:
        rule["rank"] = 4
    return rule


@pytest.mark.parametrize("name", sorted(methods()))
def test_bf16_model_matches_fp32_twin(name):
    spec = {"adapters": [rule_for(name)]}
    calibration = [token_inputs(2, 16, seed=s) for s in range(3)]
    ref = peftc.compile(tiny_llama(layers=1), spec, token_inputs(), calibration=calibration).eval()
    perturb(ref.trainable_parameters(), std=0.5)
    with torch.no_grad():
        for key, p in ref.named_adapter_parameters().items():
            if key.endswith("delora_lambda"):  # DeLoRA's update is λ-bounded; make it show
                p.fill_(30.0)
    low = peftc.compile(
        tiny_llama(layers=1).to(torch.bfloat16), spec, token_inputs(), calibration=calibration
    ).eval()
    with torch.no_grad():
        for p, q in zip(low.trainable_parameters(), ref.trainable_parameters(), strict=True):
            p.copy_(q)
        x = token_inputs(3, 20, seed=5)
        expected = ref(**x).logits
        assert (expected - tiny_llama(layers=1)(**x).logits).abs().max() > 0.05  # a visible update
        out = low(**x).logits
        assert out.dtype == torch.bfloat16
        torch.testing.assert_close(out.float(), expected, atol=BF16, rtol=0)
        torch.testing.assert_close(low.merge()(**x).logits.float(), expected, atol=BF16, rtol=0)
