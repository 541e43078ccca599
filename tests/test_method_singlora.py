"""SingLoRA against the reference formula (fp32, 1e-5): the ramp u(t) and its counter, the
non-square rule, the merge at the current u, LoRA with the same factors, and its refusals.
The method-generic checks are tests/test_methods.py's and its siblings'."""

import pytest
import torch

import peftc
from passes.merge import merged_weights
from rewrite.spec import SpecError
from tests.oracle import TOL, one_conv2d, one_linear, perturbed


def set_step(one, t: int) -> None:
    with torch.no_grad():
        one.adapted.named_adapter_parameters()["adapters.0.singlora_t"].fill_(t)


def reference(one, u: float, s: float) -> torch.Tensor:
    """y = x·Wᵀ + b + s·u·x·(A[:out]·A[:in]ᵀ)ᵀ."""
    A, W, b = one.tensors()["singlora_A"], one.layer.weight.detach(), one.layer.bias.detach()
    o, i = W.shape
    return one.x @ (W + s * u * A[:o] @ A[:i].T).T + b


def test_init_is_the_identity_and_the_forward_follows_the_ramp():
    one = one_linear("singlora", rank=4, alpha=6.0, ramp_up_steps=10)
    t = one.tensors()
    A = t["singlora_A"]
    params = one.adapted.named_adapter_parameters()
    assert A.shape == (24, 4) and params["adapters.0.singlora_A"].requires_grad
    assert not params["adapters.0.singlora_t"].requires_grad
    assert t["singlora_t"].dtype == torch.int64 and int(t["singlora_t"]) == 0
    assert A.abs().max() <= 0.5  # Kaiming-uniform, a = √5: bound 1/√fan_in, fan_in = r = 4
    torch.testing.assert_close(one.out(), one.base_out(), atol=0, rtol=0)  # u(0) = 0
    perturbed(one)
    for step, u in ((5, 0.5), (30, 1.0)):  # u = min(t / 10, 1)
        set_step(one, step)
        expected = reference(one, u, 6.0 / 4)
        assert (expected - one.base_out()).abs().max() > 1e-3
        torch.testing.assert_close(one.out(), expected, atol=TOL, rtol=TOL)


def test_training_forwards_count_and_eval_forwards_do_not():
    """t counts training forward passes; each uses u at its own count (incremented first)."""
    one = perturbed(one_linear("singlora", rank=4, ramp_up_steps=10))
    model = one.adapted.train()
    for step in (1, 2, 3):
        y = model(one.x)
        torch.testing.assert_close(y.detach(), reference(one, step / 10, 2.0), atol=TOL, rtol=TOL)
        y.sum().backward()
    assert int(one.tensors()["singlora_t"]) == 3
    model.eval()
    one.out()
    assert int(one.tensors()["singlora_t"]) == 3
    torch.testing.assert_close(one.out(), reference(one, 0.3, 2.0), atol=TOL, rtol=TOL)


def test_graphs_read_the_counter_and_the_training_graph_keeps_u_for_the_backward():
    """No graph writes t (the pipeline advances it), and in training u goes through peftc's own
    op, so torch.compile's partitioner saves u instead of recomputing it from t."""
    one = one_linear("singlora", rank=4)
    for training in (True, False):
        graph = one.adapted.program(training=training).graph
        counter = next(n for n in graph.nodes if n.op == "placeholder" and "singlora_t" in n.name)
        assert counter.users and all(not u.target._schema.is_mutable for u in counter.users)
        ramp = [n for n in graph.nodes if n.target is torch.ops.peftc.singlora_ramp.default]
        assert [n.args[0] for n in ramp] == ([counter] if training else [])


def test_non_square_rule_and_merge_at_the_current_ramp():
    """out 20 > in 8: A is [20, r], ΔW = A[:20]·A[:8]ᵀ; merging mid-ramp bakes u in."""
    one = perturbed(one_linear("singlora", in_features=8, out_features=20, rank=4))
    assert one.tensors()["singlora_A"].shape == (20, 4)
    set_step(one, 25)  # u = 0.25 of the default 100 steps
    expected = reference(one, 0.25, 8.0 / 4)
    torch.testing.assert_close(one.out(), expected, atol=TOL, rtol=TOL)
    A, W = one.tensors()["singlora_A"], one.layer.weight.detach()
    merged = merged_weights(one.adapted.plan.assignments, one.adapted.state())["0"]
    torch.testing.assert_close(merged, W + 2.0 * 0.25 * A @ A[:8].T, atol=TOL, rtol=TOL)
    with torch.no_grad():
        torch.testing.assert_close(one.adapted.merge()(one.x), expected, atol=TOL, rtol=TOL)


def test_equals_lora_with_a_in_and_a_out_at_full_ramp():
    """At u = 1, SingLoRA is a LoRA with lora_A = A[:in]ᵀ and lora_B = A[:out], same alpha."""
    one = perturbed(one_linear("singlora", rank=4, ramp_up_steps=0))  # no ramp: u = 1
    A = one.tensors()["singlora_A"]
    lora = one_linear("lora", rank=4, alpha=8.0)
    with torch.no_grad():
        params = lora.adapted.named_adapter_parameters()
        params["adapters.0.lora_A"].copy_(A[:24].T)
        params["adapters.0.lora_B"].copy_(A[:16])
    assert (one.out() - one.base_out()).abs().max() > 1e-3
    torch.testing.assert_close(lora.out(one.x), one.out(), atol=TOL, rtol=TOL)


def test_refusals():
    with pytest.raises(SpecError, match="singlora supports linear layers only, not conv2d"):
        one_conv2d("singlora")
    with pytest.raises(SpecError, match="ramp_up_steps .* must be a non-negative integer"):
        one_linear("singlora", ramp_up_steps=-1)
    with pytest.raises(SpecError, match="rank 20 is larger than the layer allows"):
        one_linear("singlora", rank=20)


def _singlora_llama():
    from tests.models import tiny_llama, token_inputs

    spec = {"adapters": [{"method": "singlora", "targets": ["*.q_proj"], "rank": 2}]}
    return peftc.compile(tiny_llama(layers=1), spec, token_inputs()), token_inputs()


def _singlora_linear():
    one = one_linear("singlora", rank=4, ramp_up_steps=10)
    return one.adapted, {"input": one.x}


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_activation_checkpointing_counts_each_step_once_with_the_unchecked_gradients(compiled):
    """The recompute starts from the count the forward saw and does not count again (eagerly
    it failed torch.utils.checkpoint's check that saved inputs are unchanged): per block (a
    Llama) and the whole graph (one layer: no blocks), against the same three steps without
    checkpointing (fp32, 1e-5)."""
    for make in (_singlora_llama, _singlora_linear):
        (plain, x), (checked, _) = make(), make()
        with torch.no_grad():
            for p, q in zip(plain.trainable_parameters(), checked.trainable_parameters()):
                q.copy_(p)
        plain.train()
        checked.train().gradient_checkpointing_enable()
        if compiled:
            checked.compile_for_training()
        for _ in range(3):
            for model in (plain, checked):
                out = model(**x) if "input_ids" in x else model(x["input"])
                (out.logits if "input_ids" in x else out).square().mean().backward()
        counts = [
            {k: int(v) for k, v in m.named_adapter_parameters().items() if "singlora_t" in k}
            for m in (plain, checked)
        ]
        assert counts[0] == counts[1] and set(counts[0].values()) == {3}
        grads = [[p.grad for p in m.trainable_parameters()] for m in (plain, checked)]
        assert all(g.abs().max() > 0 for g in grads[0])
        for g, h in zip(*grads, strict=True):
            torch.testing.assert_close(h, g, atol=TOL, rtol=TOL)


def test_a_forward_that_writes_its_counter_is_refused_naming_the_counter_spec(monkeypatch):
    """The contract: forwards only read their tensors. SingLoRA's first form (`t.add_(1)` in
    the forward) now fails at compile, saying to declare the count `counter=True`."""
    from passes.adapters.singlora import SingLoRA

    own = SingLoRA.forward

    def writes(self, x, base_out, W, p, ctx):
        p["singlora_t"].add_(1)
        return own(self, x, base_out, W, p, ctx)

    monkeypatch.setattr(SingLoRA, "forward", writes)
    # hyperparameters of its own, so no snippet traced by another test is reused
    with pytest.raises(
        ValueError, match=r"singlora at 0: its forward writes its input .*singlora_t.* counter=True"
    ):
        one_linear("singlora", rank=3, ramp_up_steps=7)
