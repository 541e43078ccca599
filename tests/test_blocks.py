"""The flat graph cut into per-block pieces (lowering/blocks.py, what FSDP2 shards): the
pieces run in order give the flat graph's outputs and gradients exactly, each block owns its
layer's base weights and adapter tensors, and a graph whose blocks interleave is refused."""

import pytest
import torch

import peftc
from lowering.blocks import BlockSplitError, block_paths, split_blocks
from rewrite.trace import bind_call
from tests.models import perturb, tiny_llama, token_inputs

SPEC = {"adapters": [{"method": "lora", "targets": ["q_proj", "v_proj"], "rank": 4}]}


def test_pieces_in_order_are_the_flat_graph():
    adapted = peftc.compile(tiny_llama(), SPEC, token_inputs()).train()
    perturb(adapted.trainable_parameters())
    pipeline = adapted.pipeline
    paths = block_paths(pipeline.sites, pipeline.model)
    assert paths == ["model.layers.0", "model.layers.1"]
    program = pipeline.program(True)
    top, blocks = split_blocks(program, pipeline.model, pipeline.adapters, paths)
    assert list(blocks) == paths
    owned = blocks["model.layers.1"].owned()
    assert "model.layers.1.self_attn.q_proj.weight" in owned
    assert "adapters.model.layers.1.self_attn.q_proj.lora_A" in owned
    assert not any(".layers.0." in name for name in owned)

    x = bind_call(pipeline.model, (), token_inputs(2, 11, seed=4))
    runs = []
    for runner in (None, top):
        torch.manual_seed(0)  # the same dropout masks
        out = program.run(pipeline.state(), x, runner).logits
        out.square().mean().backward()
        runs.append((out.detach(), [p.grad.clone() for p in adapted.trainable_parameters()]))
        adapted.zero_grad()
    (flat, flat_grads), (pieces, piece_grads) = runs
    assert flat.abs().max() > 0
    assert torch.equal(pieces, flat)
    for a, b in zip(piece_grads, flat_grads, strict=True):
        assert torch.equal(a, b)


class Interleaved(torch.nn.Module):
    """Two blocks whose computations interleave: layer 1 runs between layer 0's two halves."""

    def __init__(self):
        super().__init__()
        self.layers = torch.nn.ModuleList(
            torch.nn.ModuleDict({"a": torch.nn.Linear(8, 8), "b": torch.nn.Linear(8, 8)})
            for _ in range(2)
        )

    def forward(self, x):
        first, second = self.layers
        h = first["a"](x)
        h = second["a"](h)
        return first["b"](h) + second["b"](h)


def test_interleaved_blocks_are_refused_by_name():
    model = Interleaved()
    adapted = peftc.compile(
        model, {"adapters": [{"method": "lora", "targets": "all-linear"}]}, (torch.randn(2, 8),)
    )
    pipeline = adapted.pipeline
    with pytest.raises(BlockSplitError, match=r"interleaves layers\.0 and layers\.1"):
        split_blocks(pipeline.program(True), model, pipeline.adapters, ["layers.0", "layers.1"])
