"""Fusion passes: fused equals unfused in forward and gradients (fp32, 1e-5), keys unchanged."""

import pytest
import torch
from safetensors.torch import load_file

import peftc
from tests.models import perturb, tiny_gpt2, tiny_llama, token_inputs

ALL_LLAMA = [
    "*.q_proj",
    "*.k_proj",
    "*.v_proj",
    "*.o_proj",
    "*.gate_proj",
    "*.up_proj",
    "*.down_proj",
]
CASES = {
    "llama": (tiny_llama, ALL_LLAMA, 4),  # q/k/v and gate/up share inputs: 2 groups per layer
    "gpt2": (tiny_gpt2, ["*.c_attn", "*.c_proj", "*.c_fc"], 0),  # no two sites share an input
}


def _pair(make, targets):
    base = make()
    spec = {"adapters": [{"method": "lora", "targets": targets, "rank": 4, "alpha": 8}]}
    fused = peftc.compile(base, spec, token_inputs()).train()
    plain = peftc.compile(base, spec, token_inputs(), fuse=False).train()
    perturb(fused.trainable_parameters())
    with torch.no_grad():
        for p, q in zip(plain.trainable_parameters(), fused.trainable_parameters(), strict=True):
            p.copy_(q)
    return base, fused, plain


@pytest.fixture(scope="module")
def pairs():
    """Per architecture, a fused and an unfused model with the same values, built once."""
    return {}


@pytest.fixture
def pair(pairs):
    """`pair(name)`: that architecture's (base, fused, plain), in training mode and without
    gradients after the test."""
    handed = []

    def get(name):
        if name not in pairs:
            make, targets, _ = CASES[name]
            pairs[name] = _pair(make, targets)
        handed.append(pairs[name])
        return pairs[name]

    yield get
    for _, fused, plain in handed:
        for model in (fused, plain):
            model.zero_grad(set_to_none=True)
            model.train()


@pytest.mark.parametrize("name", list(CASES))
def test_fused_equals_unfused_forward_and_gradients(pair, name):
    _, _, groups = CASES[name]
    base, fused, plain = pair(name)
    fuse_record = next(r for r in fused.pass_records if r.name == "fuse_siblings")
    assert fuse_record.rules["fuse_shared_input_matmuls"].matches == groups
    x = token_inputs(3, 10, seed=4)
    torch.manual_seed(0)  # GPT-2's own dropouts: the same masks for both graphs
    a = fused(**x).logits
    torch.manual_seed(0)
    b = plain(**x).logits
    with torch.no_grad():
        assert (b - base(**x).logits).abs().max() > 1e-3
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    a.square().mean().backward()
    b.square().mean().backward()
    for (n, p), q in zip(
        fused.named_adapter_parameters().items(), plain.trainable_parameters(), strict=True
    ):
        assert p.grad is not None and p.grad.abs().max() > 0, n
        torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-5)


def test_pipeline_names_and_debug_diff_show_the_fusion(capsys):
    base = tiny_llama()
    spec = {"adapters": [{"method": "lora", "targets": ALL_LLAMA, "rank": 4}]}
    adapted = peftc.compile(base, spec, token_inputs(), debug=True)
    assert [r.name for r in adapted.pass_records] == [
        "insert_adapters",
        "fold_scale",
        "fuse_siblings",
        "cleanup",
    ]
    err = capsys.readouterr().err
    assert "[peftc] pass fuse_siblings" in err
    assert "torch.ops.aten.cat.default([" in err and "split_with_sizes" in err
    assert "rule scale_widening_weight: 14 matches" in err  # the scale moved onto each B
    muls = [
        n
        for n in adapted.program().graph.nodes
        if n.meta.get("peftc") and n.target == torch.ops.aten.mul.Tensor
    ]
    assert len(muls) == 14 and all(m.args[0].op == "placeholder" for m in muls)


def test_live_dropout_keeps_masks_separate(pair):
    rule = {"method": "lora", "targets": ALL_LLAMA, "rank": 4, "alpha": 8, "dropout": 0.1}
    spec = {"adapters": [rule]}
    fused = peftc.compile(tiny_llama(), spec, token_inputs()).train()
    _, _, plain = pair("llama")  # unfused, no dropout: in eval mode, the same function
    with torch.no_grad():
        theirs = plain.named_adapter_parameters()
        for n, p in fused.named_adapter_parameters().items():
            p.copy_(theirs[n])
    train_graph = fused.program(True).graph
    assert not any(n.meta.get("peftc", {}).get("role") == "fused" for n in train_graph.nodes)
    dropouts = [
        n
        for n in train_graph.nodes
        if n.target == torch.ops.aten.dropout.default and n.meta.get("peftc")
    ]
    assert len(dropouts) == 14  # one mask per site, as unfused
    # eval mode: dropout is off, so siblings fuse there and outputs still agree
    fused.eval()
    plain.eval()
    eval_graph = fused.program(False).graph
    assert any(n.meta.get("peftc", {}).get("role") == "fused" for n in eval_graph.nodes)
    x = token_inputs(2, 8, seed=1)
    torch.testing.assert_close(fused(**x).logits, plain(**x).logits, atol=1e-5, rtol=1e-5)


def test_fusion_keeps_checkpoint_keys(pair, tmp_path):
    _, fused, plain = pair("llama")
    fused.save_adapter(tmp_path / "fused")
    plain.save_adapter(tmp_path / "plain")
    a = load_file(str(tmp_path / "fused" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "plain" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and len(a) == 28
    for k in a:
        assert torch.equal(a[k], b[k])


def test_merge_after_fusion_equals_unmerged(pair):
    _, fused, _ = pair("llama")
    fused.eval()
    merged = fused.merge()
    x = token_inputs(2, 12, seed=8)
    with torch.no_grad():
        torch.testing.assert_close(merged(**x).logits, fused(**x).logits, atol=1e-5, rtol=1e-5)
