"""Tracing: dynamic shapes, HF output structure, train/eval graphs, plain modules."""

import pytest
import torch

import peftc
from tests.models import restored, tiny_llama, token_inputs

pytestmark = pytest.mark.fresh_trace  # what tracing itself does: every trace is a real export

SPEC = {
    "adapters": [{"method": "lora", "targets": ["*.q_proj", "*.v_proj"], "rank": 4, "dropout": 0.1}]
}


@pytest.fixture(scope="module")
def compiled():
    """tiny Llama and its adapted model at init (traced at 2x16), compiled once for this file."""
    base = tiny_llama()
    return base, peftc.compile(base, SPEC, token_inputs(2, 16))


@pytest.fixture
def adapted(compiled):
    """The module's adapted model in eval mode; what a test changes on it is put back."""
    with restored(compiled[1].eval()) as model:
        yield model


def test_traced_at_2x16_runs_at_3x40_and_batch_1_and_keeps_hf_output(compiled, adapted):
    base, _ = compiled
    for batch, seq in [(3, 40), (1, 7)]:
        x = token_inputs(batch, seq, seed=3)
        out = adapted(**x)
        assert type(out).__name__ == "CausalLMOutputWithPast"
        with torch.no_grad():
            torch.testing.assert_close(out.logits, base(**x).logits, atol=1e-5, rtol=1e-5)


def test_positional_and_keyword_calls_agree(adapted):
    x = token_inputs(2, 9, seed=4)
    a = adapted(x["input_ids"], x["attention_mask"]).logits
    b = adapted(input_ids=x["input_ids"], attention_mask=x["attention_mask"]).logits
    assert torch.equal(a, b)


def test_train_and_eval_graphs_differ_only_in_dropout(adapted):

    def live_dropouts(training):
        graph = adapted.program(training).graph
        return [
            n
            for n in graph.nodes
            if n.meta.get("peftc") and n.target == torch.ops.aten.dropout.default and n.args[2]
        ]

    assert len(live_dropouts(True)) == 4
    assert live_dropouts(False) == []
    torch.manual_seed(0)
    with torch.no_grad():
        for p in adapted.trainable_parameters():
            p.normal_(std=0.1)
    x = token_inputs()
    adapted.train()
    t1, t2 = adapted(**x).logits, adapted(**x).logits
    assert not torch.equal(t1, t2)  # dropout is live in training
    adapted.eval()
    e1, e2 = adapted(**x).logits, adapted(**x).logits
    assert torch.equal(e1, e2)


def test_plain_module_with_positional_input():
    net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    adapted = peftc.compile(
        net,
        {"adapters": [{"method": "lora", "targets": ["0", "2"], "rank": 2}]},
        (torch.randn(2, 8),),
    )
    assert [a.path for a in adapted.plan] == ["0", "2"]
    x = torch.randn(5, 8)
    torch.testing.assert_close(adapted(x), net(x))


class _Upcasts(torch.nn.Module):
    """Returns a linear's output and a loss over its upcast, as HF's causal LMs do, and the
    upcast itself: in an fp32 trace each cast returns its input tensor itself."""

    def __init__(self):
        super().__init__()
        self.l = torch.nn.Linear(8, 8)

    def forward(self, x):
        y = self.l(x)
        loss = y.float().pow(2).mean() + y.to(torch.float32).sum() + y.type_as(x).mean()
        return loss, y, self.l(x).float()


def test_a_cast_that_is_a_noop_when_traced_leaves_its_input_as_it_was():
    """Under bf16 autocast the casts are real. The traced graph returns, as the eager model
    does, the linear's bf16 output for `y` and fp32 for the upcast, and the loss from the
    upcast: torch.export tracks values by tensor object, and once read every use of `y` from
    its `.float()` node (pytorch's no-op cast returns `self`)."""
    net = _Upcasts()
    x = torch.randn(3, 8)
    adapted = peftc.compile(
        net, {"adapters": [{"method": "lora", "targets": ["l"], "rank": 2}]}, (torch.randn(2, 8),)
    )
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want, got = net(x), adapted(x)
    assert [t.dtype for t in want] == [torch.float32, torch.bfloat16, torch.float32]
    assert [t.dtype for t in got] == [t.dtype for t in want]
    for g, w in zip(got, want, strict=True):  # the same bf16 GEMMs: equal up to summation order
        torch.testing.assert_close(g, w, atol=1e-2, rtol=1e-2)
    graph = adapted.program().graph_module.graph
    assert not [n for n in graph.nodes if n.target is torch.ops.aten.alias.default]
