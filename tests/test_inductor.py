"""Training lowering through Inductor: equal to eager, fullgraph, no recompiles, hot-swap, training.

Tolerances (fp32): Inductor reorders reductions, so compiled and eager agree to 1e-5 on the
loss and 1e-4 on gradients; bf16 autocast against fp32 to 5e-2.
"""

import copy
import re

import pytest
import torch
from peft import PeftModel
from torch._dynamo.utils import counters
from torch._inductor.utils import run_and_get_code

import peftc
from lowering.inductor import INDUCTOR_OPTIONS, inductor_options, kernel_backend
from tests.models import perturb, tiny_llama, token_inputs

TARGETS = [
    "*.q_proj",
    "*.k_proj",
    "*.v_proj",
    "*.o_proj",
    "*.gate_proj",
    "*.up_proj",
    "*.down_proj",
]
SPEC = {"adapters": [{"method": "lora", "targets": TARGETS, "rank": 4, "alpha": 8}]}


def loss_of(model, x):
    logits = model(**x).logits
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1), x["input_ids"][:, 1:].flatten()
    )


@pytest.fixture(scope="module")
def pair():
    """A compiled adapted model, an eager twin with the same tensors, and the generated code."""
    torch._dynamo.reset()
    counters.clear()
    base = tiny_llama(layers=1)
    eager = peftc.compile(base, SPEC, token_inputs()).train()
    perturb(eager.trainable_parameters())
    compiled = peftc.compile(copy.deepcopy(base), SPEC, token_inputs()).train()
    with torch.no_grad():
        for p, q in zip(compiled.trainable_parameters(), eager.trainable_parameters(), strict=True):
            p.copy_(q)
    compiled.compile_for_training()
    x = token_inputs(2, 16)
    loss, code = run_and_get_code(lambda: loss_of(compiled, x))
    return base, eager, compiled, loss, code


def test_compiled_step_equals_eager(pair):
    _, eager, compiled, loss, _ = pair
    x = token_inputs(2, 16)
    expected = loss_of(eager, x)
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-5)
    loss.backward()
    expected.backward()
    for p, q in zip(compiled.trainable_parameters(), eager.trainable_parameters(), strict=True):
        assert q.grad.abs().max() > 0
        torch.testing.assert_close(p.grad, q.grad, atol=1e-4, rtol=1e-4)
        p.grad = q.grad = None


def test_inductor_generated_cpp_kernels_on_cpu(pair):
    code = "\n".join(pair[4])
    assert kernel_backend("cpu") == "cpp" and kernel_backend("cuda") == "triton"
    assert "cpp_fused" in code  # C++ kernels on CPU; the same path emits Triton on a GPU


def test_training_compiles_take_a_mode_alongside_peftcs_inductor_options():
    # torch.compile refuses a mode together with options, so the mode is spelled out
    options = inductor_options("max-autotune-no-cudagraphs")
    assert options["max_autotune"] is True
    assert options["realize_cpu_opcount_threshold"] == 20
    assert inductor_options(None) == INDUCTOR_OPTIONS
    with pytest.raises(RuntimeError, match="Unrecognized mode=fastest"):
        inductor_options("fastest")


def test_no_graph_breaks_and_no_recompiles_across_sequence_lengths(pair):
    compiled = pair[2]
    with torch._dynamo.config.patch(error_on_recompile=True):
        for seq in (16, 32, 48):
            loss_of(compiled, token_inputs(2, seq, seed=seq)).backward()
    assert not counters["graph_break"]
    assert counters["stats"]["unique_graphs"] == 1


def test_hot_swapping_an_adapter_does_not_recompile(pair, tmp_path):
    base, _, compiled, _, _ = pair
    other = peftc.compile(copy.deepcopy(base), SPEC, token_inputs()).train()
    perturb(other.trainable_parameters(), seed=7)  # weights unlike the compiled model's
    other.save_adapter(tmp_path)
    x = token_inputs(2, 24, seed=3)
    before = loss_of(compiled, x).detach()
    compiled.load_adapter(tmp_path)
    with torch._dynamo.config.patch(error_on_recompile=True):
        swapped = loss_of(compiled, x)
    assert (swapped - before).abs() > 1e-3  # the load changed what the compiled graph computes
    torch.testing.assert_close(swapped, loss_of(other, x), atol=1e-5, rtol=1e-5)


def test_twenty_compiled_steps_lower_the_loss_and_reload_into_peft(pair, tmp_path):
    base, _, compiled, _, _ = pair
    opt = torch.optim.AdamW(compiled.trainable_parameters(), lr=5e-3)
    x = token_inputs(4, 16, seed=11)
    losses = []
    for _ in range(20):
        loss = loss_of(compiled, x)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses
    compiled.eval().save_adapter(tmp_path)
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    y = token_inputs(3, 10, seed=12)
    with torch.no_grad():
        torch.testing.assert_close(
            peft_model(**y).logits, compiled(**y).logits, atol=1e-5, rtol=1e-5
        )
    compiled.train()


def test_dropout_with_activation_checkpointing_compiles_and_trains():
    base = tiny_llama(layers=1)
    spec = {
        "adapters": [
            {"method": "lora", "targets": ["*.q_proj", "*.v_proj"], "rank": 4, "dropout": 0.1}
        ]
    }
    adapted = peftc.compile(base, spec, token_inputs()).train()
    adapted.compile_for_training(activation_checkpointing=True)
    opt = torch.optim.AdamW(adapted.trainable_parameters(), lr=1e-2)
    x = token_inputs(4, 16, seed=2)
    losses = []
    for _ in range(8):
        loss = loss_of(adapted, x)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses


def test_bf16_base_with_fp32_adapters_under_autocast(pair):
    ref = pair[1]  # the eager twin: fp32, perturbed
    low = peftc.compile(tiny_llama(layers=1).to(torch.bfloat16), SPEC, token_inputs()).train()
    low.adapters.float()  # keep the trainable tensors (and their grads) in fp32
    with torch.no_grad():
        for p, q in zip(low.trainable_parameters(), ref.trainable_parameters(), strict=True):
            p.copy_(q)
    x = token_inputs(2, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = loss_of(low, x)
    loss.backward()
    assert all(
        p.dtype == torch.float32 and p.grad.dtype == torch.float32
        for p in low.trainable_parameters()
    )
    torch.testing.assert_close(loss.float(), loss_of(ref, x), atol=5e-2, rtol=5e-2)


class Block(torch.nn.Module):
    """A transformer-style MLP block, adapted and compiled on its own, as torchtune does."""

    def __init__(self, d: int = 32) -> None:
        super().__init__()
        self.up = torch.nn.Linear(d, 4 * d)
        self.down = torch.nn.Linear(4 * d, d)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden + self.down(torch.nn.functional.gelu(self.up(hidden)))


def adapter_grads_and_input_grad(model, hidden):
    """Adapter gradients of sum(out²), and the gradient that reached `hidden` (or None)."""
    model.zero_grad(set_to_none=True)
    hidden.grad = None
    (model(hidden) ** 2).sum().backward()
    return [p.grad for p in model.trainable_parameters()], hidden.grad


def gemm_calls(code: list[str]) -> int:
    return sum(len(re.findall(r"extern_kernels\.(?:mm|addmm|bmm)\(", c)) for c in code)


def test_block_input_requires_grad_changing_does_not_recompile():
    """pytorch#141039: the first block's input needs no grad, a later block's does. Each
    pattern is compiled once, and the input that needs no grad costs no gradient work."""
    spec = {"adapters": [{"method": "lora", "targets": ["up", "down"], "rank": 4}]}
    torch.manual_seed(0)
    block, example = Block(), (torch.randn(2, 8, 32),)
    eager, compiled = (peftc.compile(copy.deepcopy(block), spec, example).train() for _ in "ab")
    perturb(eager.trainable_parameters())
    perturb(compiled.trainable_parameters())
    compiled.compile_for_training()
    first_block = torch.randn(2, 8, 32)
    later_block = torch.randn(2, 8, 32, requires_grad=True)
    _, no_input_grad = run_and_get_code(lambda: adapter_grads_and_input_grad(compiled, first_block))
    _, input_grad = run_and_get_code(lambda: adapter_grads_and_input_grad(compiled, later_block))
    # the input's gradient through up's base weight and its LoRA A: two GEMMs fewer without it
    assert gemm_calls(no_input_grad) == gemm_calls(input_grad) - 2
    with torch._dynamo.config.patch(error_on_recompile=True):
        for hidden in (first_block, later_block, first_block):
            got, got_input = adapter_grads_and_input_grad(compiled, hidden)
            want, want_input = adapter_grads_and_input_grad(eager, hidden)
            for g, w in zip(got, want, strict=True):
                assert w.abs().max() > 0
                torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)
            if hidden.requires_grad:
                torch.testing.assert_close(got_input, want_input, atol=1e-4, rtol=1e-4)
            else:
                assert got_input is None and not hidden.requires_grad


def test_frozen_weights_cast_once_under_autocast_and_again_when_changed(pair):
    from lowering.frozen_casts import FrozenCasts, castable_slots

    base, eager, compiled, _, _ = pair
    program = compiled.pipeline.program(training=True)
    names = {program.slots[i].target for i in castable_slots(program)}
    assert "model.layers.0.self_attn.q_proj.weight" in names
    assert not {"model.embed_tokens.weight", "model.norm.weight"} & names  # read by non-matmuls

    state = compiled.pipeline.state()
    i = next(i for i, s in enumerate(program.slots) if s.target.endswith("q_proj.weight"))
    args = tuple(state[s.target] if s.target in state else None for s in program.slots)
    casts = FrozenCasts([i])
    assert casts.apply(args) == (args, None)  # no autocast: the fp32 weight itself
    with torch.autocast("cpu", dtype=torch.bfloat16):
        first, dtype = casts.apply(args)
        assert dtype == torch.bfloat16 and first[i].dtype == torch.bfloat16
        assert casts.apply(args)[0][i] is first[i]  # kept between steps
        with torch.no_grad():
            args[i].mul_(1.5)  # an in-place change bumps the version: cast again
        assert torch.equal(casts.apply(args)[0][i], args[i].to(torch.bfloat16))
        with torch.no_grad():
            args[i].div_(1.5)

    # the compiled step on the kept copies equals the eager graph under autocast, also after
    # a frozen weight changed in place between steps
    x = token_inputs(2, 16)
    weights = [m.pipeline.state()["model.layers.0.mlp.down_proj.weight"] for m in (compiled, eager)]
    for step in range(2):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got, want = loss_of(compiled, x), loss_of(eager, x)
        assert not torch.equal(got.detach(), loss_of(base, x).detach())
        torch.testing.assert_close(got, want, atol=1e-2, rtol=1e-2)  # bf16 matmuls both
        with torch.no_grad():
            for w in weights:
                w.mul_(3.0 if step == 0 else 1 / 3.0)
