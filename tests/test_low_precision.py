"""Every method on a bf16 model: compiled, run and merged against an fp32 twin holding the same
tensors (the method's shared fp32 model, tests/method_cases.py). Tolerance (bf16, logits and
updates of magnitude about 1): 5e-2, as for bf16 autocast in test_inductor."""

import pytest
import torch

import peftc
from tests.method_cases import base_model, example_inputs, names
from tests.models import token_inputs

BF16 = 5e-2
STD = 0.5  # an update well above the bf16 tolerance


@pytest.mark.parametrize("name", names())
def test_bf16_model_matches_fp32_twin(method_model, name):
    model = method_model(name)
    case, ref = model.case, model.adapted
    case.perturb(ref, std=STD)  # noise, then the case's fill
    low = peftc.compile(
        base_model().to(torch.bfloat16), case.spec(), example_inputs(), calibration=case.calibration
    ).eval()
    with torch.no_grad():
        for p, q in zip(low.trainable_parameters(), ref.trainable_parameters(), strict=True):
            p.copy_(q)
    case.apply_fill(low)  # frozen state the update depends on (SingLoRA's step counter)
    with torch.no_grad():
        x = token_inputs(3, 20, seed=5)
        expected = ref(**x).logits
        assert (expected - model.base(**x).logits).abs().max() > 0.05  # a visible update
        out = low(**x).logits
        assert out.dtype == torch.bfloat16
        torch.testing.assert_close(out.float(), expected, atol=BF16, rtol=0)
        if case.cls.mergeable:
            torch.testing.assert_close(low.merge()(**x).logits.float(), expected, atol=BF16, rtol=0)
