"""The fused linear + cross-entropy pass (passes/fused_loss.py) on a tiny Llama traced with labels.

Oracle: the same adapted model compiled with fused_loss=False (today's graph: the head's
logits, upcast, HF's cross_entropy), eager. Tolerances (fp32): loss and adapter gradients to
1e-5 relative, eager and under compile_for_training (Inductor reorders the graph's other
reductions; measured differences are near 1e-7). Labels carry -100 padding.
"""

import copy

import pytest
import torch

import peftc
from passes.fused_loss import _compiled_passes, compiled_step, linear_cross_entropy
from passes.pipeline import ADAPT_TRAINING
from tests.models import perturb, tiny_llama, token_inputs

SPEC = {"adapters": [{"method": "lora", "targets": ["q_proj", "v_proj"], "rank": 4}]}
VOCAB = 128  # tiny_llama's
FUSED_OP = torch.ops.peftc.linear_cross_entropy.default


def example():
    """tests/test_trainer.py's example inputs, bit for bit, so the two files share their traces
    (tests/shared_traces.py); the padded labels below are call inputs, not trace inputs."""
    g = torch.Generator().manual_seed(0)
    ids = (10 + torch.randint(0, 4, (8, 16), generator=g))[0].unsqueeze(0).repeat(2, 1)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def labelled(batch=2, seq=16, seed=0):
    x = token_inputs(batch, seq, seed=seed)
    labels = x["input_ids"].clone()
    labels[0, :5] = -100  # padding: these positions add nothing to the loss
    return {**x, "labels": labels}


@pytest.fixture(scope="module")
def models():
    """The base, and the same adapted Llama with the fused loss on and off (equal adapters)."""
    base = tiny_llama(layers=1).train()
    on = peftc.compile(copy.deepcopy(base), SPEC, example()).train()
    off = peftc.compile(copy.deepcopy(base), SPEC, example(), fused_loss=False).train()
    perturb(on.trainable_parameters())
    perturb(off.trainable_parameters())
    return base, on, off


def grads(model):
    out = {n: p.grad.clone() for n, p in model.named_adapter_parameters().items()}
    model.zero_grad(set_to_none=True)
    return out


def assert_relative(actual, expected, tol=1e-5):
    scale = expected.abs().max()
    assert scale > 0
    assert (actual - expected).abs().max() <= tol * scale, (actual, expected)


def test_bf16_autocast_trains_fused_and_unfused_as_fp32_does(models):
    """Under bf16 autocast (weights and adapters fp32) both graphs run (torch.export's dtype
    checks before the model's upcasts used to refuse the bf16 logits), their bf16 matmuls
    move the loss, and loss and gradients stay within 5e-2 of fp32 (test_inductor's bf16
    tolerance). Both eager, before the next test compiles `on`: the compiled path's casts are
    the op-level test's at the end."""
    _, on, off = models
    x = labelled(2, 16, seed=4)
    want = off(**x).loss
    want.backward()
    want_grads = grads(off)
    for model in (off, on):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(**x)
        loss = out.loss
        assert loss.dtype == torch.float32 and loss != want  # bf16 GEMMs ran
        if model is off:  # as eager HF: the head's bf16 logits, not the loss's upcast of them
            assert out.logits.dtype == torch.bfloat16
        torch.testing.assert_close(loss, want, atol=5e-2, rtol=5e-2)
        loss.backward()
        for name, g in grads(model).items():
            torch.testing.assert_close(g, want_grads[name], atol=5e-2, rtol=5e-2)


def test_loss_and_adapter_gradients_equal_the_unfused_graph_eager_and_compiled(models):
    base, on, off = models
    x = labelled(2, 16, seed=3)
    expected = off(**x)
    with torch.no_grad():
        assert (expected.loss - base(**x).loss).abs() > 1e-4  # the adapters change the loss
    expected.loss.backward()
    want = grads(off)
    fused = on(**x)
    assert fused.logits is None  # skipped, as Liger's skip_logits
    assert_relative(fused.loss, expected.loss)
    fused.loss.backward()
    for name, g in grads(on).items():
        assert_relative(g, want[name])
    on.compile_for_training()  # last: the other tests read graphs and eval mode only
    loss = on(**x).loss
    assert_relative(loss, expected.loss)
    loss.backward()
    for name, g in grads(on).items():
        assert_relative(g, want[name])


def _vocab_sized(program):
    """Nodes whose value has a [tokens, vocab]-like shape: vocab and a symbolic (token) dim."""
    found = []
    for node in program.graph.nodes:
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor) and VOCAB in val.shape:
            if any(isinstance(d, torch.SymInt) for d in val.shape):
                found.append(node.name)
    return found


def test_fused_training_graph_holds_no_tokens_by_vocab_tensor(models):
    _, on, off = models
    assert _vocab_sized(off.program(True))  # the check can fail: today's graph has the logits
    program = on.program(True)
    assert not _vocab_sized(program)
    targets = [n.target for n in program.graph.nodes]
    assert FUSED_OP in targets and torch.ops.aten.cross_entropy_loss.default not in targets
    assert [r.name for r in on.pass_records] == list(ADAPT_TRAINING)


def test_eval_graph_unchanged_and_option_off_gives_todays_graph(models):
    _, on, off = models
    assert on.program(False).graph_module.code == off.program(False).graph_module.code
    assert "fused_loss" not in [r.name for r in off.pass_records]
    assert torch.ops.aten.cross_entropy_loss.default in [
        n.target for n in off.program(True).graph.nodes
    ]
    x = labelled(2, 8, seed=5)
    assert off(**x).logits.shape == (2, 8, VOCAB)  # off: training still returns logits
    on.eval(), off.eval()
    try:
        with torch.no_grad():
            torch.testing.assert_close(on(**x).logits, off(**x).logits, rtol=0, atol=0)
    finally:
        on.train(), off.train()


def test_an_adapted_head_is_left_unfused_with_the_reason():
    spec = {"adapters": [{"method": "lora", "targets": ["q_proj", "lm_head"], "rank": 4}]}
    adapted = peftc.compile(tiny_llama(layers=1).train(), spec, example()).train()
    record = next(r for r in adapted.pass_records if r.name == "fused_loss")
    stats = record.rules["fuse_linear_cross_entropy"]
    assert stats.matches == 0 and stats.declines == {"the output head is adapted": 1}
    assert adapted(**labelled()).logits is not None


def test_the_op_gives_the_weight_gradient_where_the_head_trains():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(3, 5, 16, generator=g, requires_grad=True)
    w = torch.randn(40, 16, generator=g, requires_grad=True)
    t = torch.randint(0, 40, (15,), generator=g)
    t[2:6] = -100
    expected = torch.nn.functional.cross_entropy((h @ w.t()).flatten(0, 1), t, reduction="sum")
    dh, dw = torch.autograd.grad(expected, (h, w))
    loss = linear_cross_entropy(h, w, t, -100, 2, True, 4)[0]  # sum, chunks of 4 rows
    assert_relative(loss, expected)
    got_h, got_w = torch.autograd.grad(loss * 3.0, (h, w))  # the incoming gradient scales
    assert_relative(got_h, 3.0 * dh)
    assert_relative(got_w, 3.0 * dw)
    with pytest.raises(RuntimeError, match="fused_loss=False"):
        linear_cross_entropy(h, w, t, -100, 1, False, 4)


def test_under_autocast_the_op_runs_its_gemms_in_autocasts_dtype_eager_and_traced():
    """h and W enter the op cast to autocast's dtype, as the unfused linear's inputs would, in
    eager calls and in a compiled graph (the casts are traced ops: the opaque op cannot see
    autocast when Inductor's code calls it). Oracle: cross_entropy of the bf16 GEMM's logits
    upcast to fp32, to 1e-5; the fp32 loss differs from it, so the check can fail. In a
    compiled step the chunks' softmax passes run compiled, and dh equals the eager loop's to
    bf16's rounding (1e-2)."""
    g = torch.Generator().manual_seed(1)
    h = torch.randn(2, 8, 32, generator=g, requires_grad=True)
    w = torch.randn(50, 32, generator=g)
    t = torch.randint(0, 50, (16,), generator=g)
    bf16_logits = (h.detach().bfloat16() @ w.bfloat16().t()).float()
    expected = torch.nn.functional.cross_entropy(bf16_logits.flatten(0, 1), t)
    fp32 = torch.nn.functional.cross_entropy((h.detach() @ w.t()).flatten(0, 1), t)
    assert (fp32 - expected).abs() > 1e-5

    def op(h, w, t):
        loss, dh, _ = FUSED_OP(h, w, t, -100, 1, False, 8)
        return loss, dh

    def in_compiled_step(h, w, t):  # as Inductor's code calls it: the chunk passes compiled
        calls = _compiled_passes.cache_info()
        with compiled_step():
            out = op(h, w, t)
        after = _compiled_passes.cache_info()
        assert after.hits + after.misses == calls.hits + calls.misses + 2  # 16 rows, 2 chunks
        return out

    compiled = torch.compile(op, backend="aot_eager", fullgraph=True)
    for run in (op, compiled, in_compiled_step):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, dh = run(h, w, t)
        assert dh.dtype == torch.bfloat16
        assert_relative(loss, expected)
        (grad,) = torch.autograd.grad(loss, h)
        assert grad.dtype == torch.float32  # back through the cast to h's own dtype
    with torch.autocast("cpu", dtype=torch.bfloat16):
        eager_dh, compiled_dh = op(h, w, t)[1], in_compiled_step(h, w, t)[1]
    torch.testing.assert_close(compiled_dh, eager_dh, atol=1e-2, rtol=1e-2)
