"""The architecture matrix: each model of tests/architectures.py (decoders with and without
GQA, q/k/v biases, a tied head, packed projections; encoders; encoder-decoders; speech;
vision; a diffusion UNet; a state-space model; a mixture of experts; matmul-style linears)
goes the whole way with `targets: all-linear` LoRA: compile, a training step that moves every
adapter, an adapted output that differs from the base, merged == unmerged (fp32, 1e-5), and
an ONNX export verified by onnxruntime at two new shapes (1e-4)."""

import pytest
import torch
import torch.utils._pytree as pytree

import peftc
from tests.architectures import ARCHITECTURES

TOL, ONNX_TOL = 1e-5, 1e-4
SPEC = {"adapters": [{"method": "lora", "targets": "all-linear", "rank": 2}]}


def _out(output) -> torch.Tensor:
    """The model's main output tensor: logits, a last hidden state or a UNet's sample."""
    if isinstance(output, torch.Tensor):
        return output
    for name in ("logits", "last_hidden_state", "sample"):
        value = getattr(output, name, None)
        if value is not None:
            return value
    raise AssertionError(f"no main output in {type(output).__name__}")


def _loss(output) -> torch.Tensor:
    """A loss that reads every float output (a pooler's too, so every adapter gets a grad)."""
    leaves = pytree.tree_leaves(output.to_tuple() if hasattr(output, "to_tuple") else output)
    return sum(t.float().square().mean() for t in leaves if torch.is_floating_point(t))


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_all_linear_lora_trains_merges_and_exports(name, tmp_path):
    base, x = ARCHITECTURES[name]()
    adapted = peftc.compile(base, SPEC, x).train()
    assert len(adapted.plan) >= 1
    before = {k: p.detach().clone() for k, p in adapted.named_adapter_parameters().items()}
    opt = torch.optim.AdamW(adapted.trainable_parameters(), lr=1e-2)
    _loss(adapted(**x)).backward()
    opt.step()
    after = adapted.named_adapter_parameters()
    assert all(not torch.equal(after[k], v) for k, v in before.items())  # every adapter moved
    adapted.eval()
    with torch.no_grad():
        ours = _out(adapted(**x))
        assert (ours - _out(base(**x))).abs().max() > 1e-4
        torch.testing.assert_close(_out(adapted.merge()(**x)), ours, atol=TOL, rtol=TOL)
    report = adapted.export_onnx(str(tmp_path / f"{name}.onnx"))
    assert len(report.max_errors) == 2 and max(report.max_errors.values()) <= ONNX_TOL


def test_the_onnx_form_of_the_grouped_matmul_equals_transformers_with_an_idle_expert():
    """lowering/grouped_mm.py's decomposition against transformers' own grouped matmul, with
    one expert that gets no rows (offs repeats a value) and one that gets them all but one."""
    from transformers.integrations.moe import _grouped_mm_fallback

    from lowering.grouped_mm import dense_grouped_mm

    g = torch.Generator().manual_seed(0)
    rows, weight = torch.randn(7, 5, generator=g), torch.randn(3, 5, 4, generator=g)
    offs = torch.tensor([1, 1, 7], dtype=torch.int32)  # expert 1 idle
    expected = _grouped_mm_fallback(rows, weight, offs)
    assert torch.equal(expected[1:], rows[1:] @ weight[2])
    torch.testing.assert_close(dense_grouped_mm(rows, weight, offs), expected, atol=TOL, rtol=TOL)


def test_a_grouped_matmul_without_offsets_is_refused_with_the_fix():
    from lowering.grouped_mm import decompose_grouped_mm

    graph = torch.fx.Graph()
    rows, weight = graph.placeholder("rows"), graph.placeholder("weight")
    graph.output(graph.call_function(torch.ops.aten._grouped_mm.default, (rows, weight)))
    module = torch.fx.GraphModule(torch.nn.Module(), graph)
    with pytest.raises(ValueError, match="experts_implementation='batched_mm'"):
        decompose_grouped_mm(module)
