"""adapted.generate: transformers' loop with its KV cache and the adapters live. Oracle: PEFT's
generate on the same adapter (greedy and seeded sampling give the same tokens), and the base
model with the merged weights."""

import copy

import pytest
import torch
from peft import PeftModel

import peftc
from passes.merge import merged_weights
from tests.models import perturb, tiny_gpt2, tiny_llama, token_inputs


class BiasAfterLinear(torch.nn.Linear):
    """A Linear subclass with a forward of its own that adds the bias after the product: the
    traced site is the product alone, and DoRA must not scale the bias."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight.T + self.bias


def llama_own_forward() -> torch.nn.Module:
    model = tiny_llama()
    for layer in model.model.layers:
        for name in ("q_proj", "v_proj"):
            old = getattr(layer.self_attn, name)
            new = BiasAfterLinear(old.in_features, old.out_features)
            with torch.no_grad():
                new.weight.copy_(old.weight)
                new.bias.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
            setattr(layer.self_attn, name, new)
    return model


SPECS = {
    "llama-lora": (tiny_llama, "lora", ["q_proj", "v_proj", "down_proj", "embed_tokens"]),
    "llama-dora": (tiny_llama, "dora", ["q_proj", "v_proj", "down_proj"]),
    "llama-dora-own-forward": (llama_own_forward, "dora", ["q_proj", "v_proj"]),
    "gpt2-lora": (tiny_gpt2, "lora", ["c_attn", "c_fc"]),
}
GEN = {"max_new_tokens": 8, "pad_token_id": 0}


def prompt() -> dict:
    return token_inputs(2, 6, seed=4)


@pytest.fixture(scope="module", params=sorted(SPECS))
def pair(request, tmp_path_factory):
    build, method, targets = SPECS[request.param]
    base = build()
    spec = {"adapters": [{"method": method, "targets": targets, "rank": 4}]}
    adapted = peftc.compile(copy.deepcopy(base), spec, token_inputs())
    perturb(adapted.trainable_parameters(), std=0.5)
    directory = tmp_path_factory.mktemp("generate")
    adapted.save_adapter(directory)
    theirs = PeftModel.from_pretrained(copy.deepcopy(base), directory).eval()
    return base, adapted, theirs


def test_greedy_tokens_equal_peft_and_differ_from_the_base(pair):
    base, adapted, theirs = pair
    ours = adapted.generate(**prompt(), **GEN)
    assert ours.shape == (2, 6 + 8)
    assert not torch.equal(ours, base.generate(**prompt(), **GEN))  # the adapters steer it
    assert torch.equal(ours, theirs.generate(**prompt(), **GEN))


def test_seeded_sampling_equals_peft(pair):
    _, adapted, theirs = pair
    torch.manual_seed(0)
    ours = adapted.generate(**prompt(), do_sample=True, top_k=20, **GEN)
    torch.manual_seed(0)
    assert torch.equal(ours, theirs.generate(**prompt(), do_sample=True, top_k=20, **GEN))


def test_generation_while_training_sees_current_values_and_keeps_the_mode(pair):
    base, adapted, _ = pair
    saved = {k: p.detach().clone() for k, p in adapted.named_adapter_parameters().items()}
    adapted.train()
    try:
        before = adapted.generate(**prompt(), **GEN)
        assert adapted.training and adapted.base.training
        merged = copy.deepcopy(base).eval()
        weights = merged_weights(adapted.plan.assignments, adapted.state())
        with torch.no_grad():
            for a in adapted.plan:
                merged.get_submodule(a.path).weight.copy_(weights[a.path])
        assert torch.equal(merged.generate(**prompt(), **GEN), before)  # merging: same tokens
        perturb(adapted.trainable_parameters(), std=0.5, seed=5)  # a training step's worth
        assert not torch.equal(adapted.generate(**prompt(), **GEN), before)
    finally:
        with torch.no_grad():
            for k, p in adapted.named_adapter_parameters().items():
                p.copy_(saved[k])
        adapted.eval()


def test_a_model_without_generate_says_so():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    adapted = peftc.compile(
        model, {"adapters": [{"method": "lora", "targets": ["0"], "rank": 2}]}, (torch.randn(2, 4),)
    )
    with pytest.raises(TypeError, match="has no generate"):
        adapted.generate(torch.randn(2, 4))
