"""LoRA against Hugging Face PEFT on four architectures, both checkpoint directions (fp32, 1e-5)."""

import copy

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

import peftc
from tests.models import (
    convnet,
    image_inputs,
    minilm_2_layers,
    perturb,
    tiny_gpt2,
    tiny_llama,
    token_inputs,
)

TOL = 1e-5  # fp32

CASES = {
    "llama": (
        tiny_llama,
        lambda: token_inputs(2, 16),
        ["q_proj", "v_proj", "down_proj", "embed_tokens"],
    ),
    "gpt2": (tiny_gpt2, lambda: token_inputs(2, 16), ["c_attn", "c_proj", "c_fc"]),
    "minilm": (
        minilm_2_layers,
        lambda: token_inputs(2, 12, vocab=30522),
        ["query", "value", "dense"],
    ),
    "convnet": (convnet, lambda: image_inputs(2), ["conv1", "conv2", "conv3", "head"]),
}


def _out(model, inputs):
    with torch.no_grad():
        out = model(**inputs) if isinstance(inputs, dict) else model(*inputs)
    return out if isinstance(out, torch.Tensor) else out[0]


def _fresh_inputs(name, batch=3):
    if name == "convnet":
        return image_inputs(batch, seed=5)
    vocab = 30522 if name == "minilm" else 128
    return token_inputs(batch, 20, vocab=vocab, seed=5)


@pytest.fixture(scope="module", params=list(CASES))
def loaded(request, tmp_path_factory):
    """PEFT's LoRA model (random A and B) saved, and peftc.from_peft's load of it."""
    name = request.param
    make, inputs, targets = CASES[name]
    base = make()
    config = LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False)
    peft_model = get_peft_model(copy.deepcopy(base), config).eval()
    directory = tmp_path_factory.mktemp(f"lora_{name}")
    peft_model.save_pretrained(directory)
    return name, base, peft_model, peftc.from_peft(base, directory, inputs()).eval()


def test_peft_checkpoint_loads_into_peftc(loaded):
    name, base, peft_model, adapted = loaded
    # traced at batch 2; batch 1 is outside what torch.export recorded (>= 2), so check it too
    for batch in (3, 1):
        x = _fresh_inputs(name, batch)
        expected = _out(peft_model, x)
        assert (expected - _out(base, x)).abs().max() > 1e-3  # the adapter does something
        torch.testing.assert_close(_out(adapted, x), expected, atol=TOL, rtol=TOL)


def test_peftc_checkpoint_loads_into_peft(loaded, tmp_path):
    name, base, peft_model, adapted = loaded
    before = [p.detach().clone() for p in adapted.trainable_parameters()]
    try:
        perturb(adapted.trainable_parameters())  # values of peftc's own, then its save
        adapted.save_adapter(tmp_path)
        theirs = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
        x = _fresh_inputs(name)
        ours = _out(adapted, x)
        assert (ours - _out(base, x)).abs().max() > 1e-3
        assert (ours - _out(peft_model, x)).abs().max() > 1e-3  # not the loaded values
        torch.testing.assert_close(_out(theirs, x), ours, atol=TOL, rtol=TOL)
    finally:
        with torch.no_grad():
            for p, v in zip(adapted.trainable_parameters(), before, strict=True):
                p.copy_(v)


def test_rank_and_alpha_patterns_round_trip(tmp_path):
    base = tiny_llama()
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj"],
        rank_pattern={"model.layers.0.self_attn.q_proj": 8},
        alpha_pattern={"v_proj": 3},
        use_rslora=True,
        init_lora_weights=False,
    )
    peft_model = get_peft_model(copy.deepcopy(base), config).eval()
    peft_model.save_pretrained(tmp_path / "peft")
    adapted = peftc.from_peft(base, tmp_path / "peft", token_inputs()).eval()
    ranks = {a.path: a.rank for a in adapted.plan}
    assert ranks["model.layers.0.self_attn.q_proj"] == 8
    assert ranks["model.layers.1.self_attn.q_proj"] == 4
    x = token_inputs(3, 9, seed=2)
    torch.testing.assert_close(_out(adapted, x), _out(peft_model, x), atol=TOL, rtol=TOL)

    adapted.save_adapter(tmp_path / "ours")
    again = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    torch.testing.assert_close(_out(again, x), _out(peft_model, x), atol=TOL, rtol=TOL)
