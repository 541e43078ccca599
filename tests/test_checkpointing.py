"""Per-block activation checkpointing (lowering/checkpointing.py): each policy and every n-th
block give the gradients of no checkpointing (fp32, 1e-5), checkpointed blocks run twice a
step (forward, recompute) and the others once, a model without repeated blocks is recomputed
whole, and a policy peftc does not have is refused with the two it has."""

import pytest
import torch

import peftc
from tests.models import ConvNet, image_inputs, perturb, tiny_llama, token_inputs

SPEC = {"adapters": [{"method": "lora", "targets": ["q_proj", "v_proj"], "rank": 4}]}
TOL = 1e-5


@pytest.fixture(scope="module")
def adapted():
    x = token_inputs(2, 12)
    x["labels"] = x["input_ids"]
    model = peftc.compile(tiny_llama(), SPEC, x).train()
    perturb(model.trainable_parameters())
    return model, x


def grads(model, x) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    model(**x).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_adapter_parameters().items()}


@pytest.mark.parametrize("policy, every", [("recompute", 1), ("save_matmuls", 1), ("recompute", 2)])
def test_checkpointed_blocks_give_the_same_gradients(adapted, policy, every):
    model, x = adapted
    plain = grads(model, x)
    assert all(g.abs().max() > 0 for g in plain.values())
    model.gradient_checkpointing_enable(every_n_layers=every, policy=policy)
    try:
        blocks = model.pipeline.runners[True]  # the top graph over the per-block pieces
        runs = {}
        for block in blocks.children():
            if hasattr(block, "pieces"):
                hook = lambda *_, path=block.path: runs.__setitem__(path, runs.get(path, 0) + 1)  # noqa: E731
                block.pieces["train"].register_forward_pre_hook(hook)
        again = grads(model, x)
    finally:
        model.gradient_checkpointing_disable()
    assert runs == {"model.layers.0": 2, "model.layers.1": 2 if every == 1 else 1}
    for name, g in plain.items():
        torch.testing.assert_close(again[name], g, atol=TOL, rtol=TOL)
    assert True not in model.pipeline.runners  # disabled: the flat graph again


def test_a_model_without_blocks_is_recomputed_whole():
    model = peftc.compile(
        ConvNet(), {"adapters": [{"method": "lora", "targets": "all-linear"}]}, image_inputs()
    )
    model.train()
    model.gradient_checkpointing_enable()
    assert True not in model.pipeline.runners  # Pipeline.run checkpoints the flat graph
    seen = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: seen.append(t) or t, lambda t: t):
        model(*image_inputs()).sum().backward()  # sum keeps nothing itself
    assert seen == []  # the whole graph is one checkpoint: nothing kept outside it


def test_an_unknown_policy_names_the_two(adapted):
    model, _ = adapted
    with pytest.raises(ValueError, match="'recompute'.*'save_matmuls'"):
        model.gradient_checkpointing_enable(policy="offload")
