"""The benchmarks' model: a Llama built from a config (nothing is downloaded) and its inputs."""

from __future__ import annotations

import torch

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VOCAB = 2000


def llama(
    hidden: int,
    layers: int,
    heads: int,
    intermediate: int | None = None,
    seq: int = 512,
    use_cache: bool = False,
    vocab: int = VOCAB,
) -> torch.nn.Module:
    """Seed 0, as many KV heads as heads, intermediate 2.6875 x hidden by default; in train
    mode, as a model built from a config is."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=intermediate or int(hidden * 2.6875),
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        vocab_size=vocab,
        max_position_embeddings=max(512, seq),
        use_cache=use_cache,
    )
    return LlamaForCausalLM(config)


def token_batch(
    batch: int, seq: int, device: str = "cpu", seed: int = 0, vocab: int = VOCAB
) -> dict:
    """Random token ids in the vocabulary and an all-ones mask."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq), generator=g).to(device)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
