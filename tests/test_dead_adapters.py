"""The first backward names the adapters that got no gradient (their output never reaches the
loss), once per model, eager and Inductor-compiled."""

from __future__ import annotations

import warnings

import pytest
import torch

import peftc
from peftc.adapted import DeadAdapterWarning
from tests.models import tiny_bert, token_inputs

# BERT's pooler is adapted, but the loss below reads only last_hidden_state
SPEC = {"adapters": [{"method": "lora", "rank": 4, "targets": ["*.value", "pooler.dense"]}]}


def mean_pooled_loss(out, batch) -> torch.Tensor:
    mask = batch["attention_mask"].unsqueeze(-1).float()
    pooled = (out.last_hidden_state * mask).sum(1) / mask.sum(1)
    return pooled.pow(2).mean()


def _dead_warnings(step) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        step()
    return [str(w.message) for w in caught if issubclass(w.category, DeadAdapterWarning)]


@pytest.fixture(scope="module")
def base():
    return tiny_bert()


def _train_step(adapted, opt, batch, loss_fn=mean_pooled_loss):
    def step():
        loss_fn(adapted(**batch), batch).backward()
        opt.step()
        opt.zero_grad()

    return step


def test_warns_once_naming_exactly_the_dead_adapter(base):
    adapted = peftc.compile(base, SPEC, token_inputs()).train()
    opt = torch.optim.SGD(adapted.trainable_parameters(), lr=0.1)
    batch = token_inputs(seed=3)
    with torch.no_grad():  # a forward without grad is no backward: the check stays armed
        assert _dead_warnings(lambda: adapted(**batch)) == []
    (message,) = _dead_warnings(_train_step(adapted, opt, batch))
    assert "1 of 3 adapters got no gradient" in message
    assert "pooler.dense" in message and "value" not in message  # only the dead one
    assert "do not reach the loss" in message
    # one warning per model: later steps check nothing, though the pooler is still dead
    assert _dead_warnings(_train_step(adapted, opt, batch)) == []
    assert adapted._grad_check_done and adapted._grad_check_hooks == []


def test_no_warning_when_every_adapter_gets_a_gradient(base):
    adapted = peftc.compile(base, SPEC, token_inputs()).train()
    opt = torch.optim.SGD(adapted.trainable_parameters(), lr=0.1)
    batch = token_inputs(seed=4)

    def both(out, b):
        return mean_pooled_loss(out, b) + out.pooler_output.pow(2).mean()

    def step():
        both(adapted(**batch), batch).backward()
        # LoRA's B starts at zero, so every A gets an all-zero gradient at the first step: an
        # adapter is dead only when all its tensors are, else this would warn for all three
        a_grads = [p.grad for n, p in adapted.named_adapter_parameters().items() if "lora_A" in n]
        assert a_grads and all(not g.any() for g in a_grads)
        opt.step()
        opt.zero_grad()

    assert _dead_warnings(step) == []
    assert adapted._grad_check_done


def test_compiled_training_warns_and_still_trains():
    # one block: the compile is the test's cost
    adapted = peftc.compile(tiny_bert(layers=1), SPEC, token_inputs()).train()
    adapted.compile_for_training()
    opt = torch.optim.SGD(adapted.trainable_parameters(), lr=0.1)
    batch = token_inputs(seed=5)
    before = adapted.named_adapter_parameters()[
        "adapters.encoder.layer.0.attention.self.value.lora_B"
    ].clone()
    (message,) = _dead_warnings(_train_step(adapted, opt, batch))
    assert "pooler.dense" in message and "value" not in message
    after = adapted.named_adapter_parameters()[
        "adapters.encoder.layer.0.attention.self.value.lora_B"
    ]
    assert not torch.equal(before, after)  # the live adapter trained through the compiled graph
    assert _dead_warnings(_train_step(adapted, opt, batch)) == []
