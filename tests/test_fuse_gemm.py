"""LoRA inside the base GEMM: equal to the plain form in forward and gradients (fp32, 1e-5)."""

import torch

import peftc
from passes.fuse_gemm import lora_in_gemm
from rewrite.sites import find_sites
from rewrite.trace import trace
from tests.models import perturb, tiny_llama, token_inputs


def test_in_gemm_function_equals_plain_lora():
    g = torch.Generator().manual_seed(0)
    x1 = torch.randn(3, 5, 12, generator=g, requires_grad=True)
    W, bias = torch.randn(7, 12, generator=g), torch.randn(7, generator=g)
    A1 = torch.randn(4, 12, generator=g, requires_grad=True)
    B1 = torch.randn(7, 4, generator=g, requires_grad=True)
    x2, A2, B2 = (t.detach().clone().requires_grad_() for t in (x1, A1, B1))
    fused = lora_in_gemm(x1, W, bias, A1, B1, 0.5)
    plain = (
        torch.nn.functional.linear(x2, W, bias)
        + torch.nn.functional.linear(torch.nn.functional.linear(x2, A2), B2) * 0.5
    )
    torch.testing.assert_close(fused, plain, atol=1e-5, rtol=1e-5)
    upstream = torch.randn(fused.shape, generator=g)
    fused.backward(upstream)
    plain.backward(upstream)
    for a, b in ((x1, x2), (A1, A2), (B1, B2)):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-5)


def test_rule_rewrites_plain_sites_and_declines_live_dropout():
    base = tiny_llama(layers=1)
    spec = {
        "adapters": [
            {"method": "lora", "targets": ["*.q_proj", "*.v_proj"], "rank": 4, "dropout": 0.1},
            {"method": "lora", "targets": ["*.o_proj", "*.down_proj"], "rank": 4},
        ]
    }
    adapted = peftc.compile(base, spec, token_inputs()).train()
    perturb(adapted.trainable_parameters())
    traced = trace(base, token_inputs(), training=True)
    program = adapted._rewrite(traced, find_sites(traced), in_gemm=True)
    fused = [n for n in program.graph.nodes if n.target is lora_in_gemm]
    assert sorted(n.meta["peftc"]["site"] for n in fused) == [
        "model.layers.0.mlp.down_proj",
        "model.layers.0.self_attn.o_proj",
    ]  # q/v keep their own dropout masks, so they stay in the plain form
    eager = adapted.program(True)
    x = token_inputs(2, 9, seed=3)
    state = adapted.state()
    inputs = dict(x)
    torch.manual_seed(0)
    a = program.run(state, inputs).logits
    torch.manual_seed(0)
    b = eager.run(state, inputs).logits
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
