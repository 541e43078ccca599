"""Sites: which ops can take adapters, and what is recorded about each."""

import torch

from rewrite.sites import find_sites, split_path, type_matches
from rewrite.trace import trace
from tests.models import convnet, image_inputs, minilm_2_layers, token_inputs


def test_llama_sites_types_layers_and_groups(traced):
    sites = traced("llama").sites
    q = sites["model.layers.1.self_attn.q_proj"]
    assert (q.op, q.module_type, q.layer, q.in_features, q.out_features) == (
        "linear",
        "self_attn.q_proj",
        1,
        64,
        64,
    )
    assert q.dtype == torch.float32 and not q.has_bias
    assert q.group == tuple(f"model.layers.1.self_attn.{n}_proj" for n in "kqv")
    gate = sites["model.layers.0.mlp.gate_proj"]
    assert gate.group == ("model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj")
    assert sites["model.layers.0.mlp.down_proj"].group == ("model.layers.0.mlp.down_proj",)
    emb = sites["model.embed_tokens"]
    assert (emb.op, emb.in_features, emb.out_features, emb.layer) == ("embedding", 128, 64, None)
    assert sites["lm_head"].module_type == "lm_head"
    assert len(sites) == 2 * 7 + 2


def test_gpt2_conv1d_is_an_addmm_site_with_transposed_weight(traced):
    sites = traced("gpt2").sites
    c_attn = sites["transformer.h.0.attn.c_attn"]
    assert c_attn.op == "addmm" and c_attn.has_bias
    assert (c_attn.in_features, c_attn.out_features) == (64, 192)
    assert c_attn.weight_shape == (64, 192)  # stored [in, out]
    assert c_attn.module_type == "attn.c_attn"


def test_bert_keeps_its_three_dense_layers_distinct():
    sites = find_sites(trace(minilm_2_layers(), token_inputs(2, 8, vocab=30522), training=False))
    types = set(sites.module_types())
    assert {"attention.output.dense", "intermediate.dense", "output.dense"} <= types
    assert sites["encoder.layer.1.output.dense"].in_features == 1536


def test_conv_sites_record_geometry():
    sites = find_sites(trace(convnet(), image_inputs(), training=False))
    conv2 = sites["conv2"]
    assert conv2.op == "conv2d"
    assert (conv2.in_features, conv2.out_features) == (8, 16)
    assert (
        conv2.conv.kernel == (3, 3) and conv2.conv.stride == (2, 2) and conv2.conv.padding == (1, 1)
    )
    assert sites["head"].op == "linear"


def test_conv1d_site():
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv1d(4, 6, 3, padding=1)

        def forward(self, x):
            return self.conv(x)

    sites = find_sites(trace(Net(), (torch.randn(2, 4, 10),), training=False))
    assert sites["conv"].op == "conv1d" and sites["conv"].conv.kernel == (3,)


def test_module_type_and_suffix_matching():
    assert split_path("model.layers.12.self_attn.q_proj") == ("self_attn.q_proj", 12)
    assert split_path("encoder.layer.0.attention.output.dense") == ("attention.output.dense", 0)
    assert split_path("lm_head") == ("lm_head", None)
    assert type_matches("self_attn.q_proj", "q_proj")
    assert type_matches("attention.output.dense", "output.dense")
    assert type_matches("output.dense", "output.dense")
    assert not type_matches("self_attn.q_proj", "proj")
