"""The architecture matrix's models: tiny configs (one or two layers), built here, never
downloaded, each with example inputs. `ARCHITECTURES` maps a name to a builder returning
(model, inputs); tests/test_architectures.py runs the whole path on each."""

from __future__ import annotations

from collections.abc import Callable

import torch

from tests import models

Built = tuple[torch.nn.Module, dict[str, torch.Tensor]]


def _ids(batch: int = 2, seq: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 128, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _text(model: torch.nn.Module) -> Built:
    return model, {"input_ids": _ids()}


def _seq2seq(model: torch.nn.Module) -> Built:
    return model, {"input_ids": _ids(), "decoder_input_ids": _ids(2, 7, seed=1)}


def _floats(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(2))


ATTENTION = {"num_attention_heads": 4, "vocab_size": 128}


def qwen2() -> Built:  # GQA (4 heads, 2 kv heads), q/k/v biases, tied output head
    return _text(models.tiny_qwen2(layers=1))


def phi3() -> Built:  # packed qkv_proj and gate_up_proj
    return _text(models.tiny_phi3(layers=1))


def gpt_neox() -> Built:  # parallel attention and MLP, partial rotary
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(0)
    config = GPTNeoXConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=1, use_cache=False, **ATTENTION
    )
    return _text(GPTNeoXForCausalLM(config).eval())


def opt() -> Built:  # learned positions, pre-norm decoder
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    config = OPTConfig(
        hidden_size=64,
        ffn_dim=128,
        num_hidden_layers=1,
        word_embed_proj_dim=64,
        max_position_embeddings=64,
        use_cache=False,
        **ATTENTION,
    )
    return _text(OPTForCausalLM(config).eval())


def bert() -> Built:  # encoder
    return _text(models.tiny_bert(layers=1))


def clip_text() -> Built:  # causal-masked text encoder
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    config = CLIPTextConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        max_position_embeddings=32,
        **ATTENTION,
    )
    return _text(CLIPTextModel(config).eval())


def t5() -> Built:  # encoder-decoder, relative position bias
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    config = T5Config(
        d_model=64,
        d_ff=128,
        d_kv=16,
        num_layers=1,
        num_heads=4,
        vocab_size=128,
        decoder_start_token_id=0,
        use_cache=False,
    )
    return _seq2seq(T5ForConditionalGeneration(config).eval())


def _speech_config(cls, **extra):
    return cls(
        d_model=64,
        encoder_ffn_dim=128,
        decoder_ffn_dim=128,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        vocab_size=128,
        max_target_positions=32,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=1,
        use_cache=False,
        **extra,
    )


def bart() -> Built:  # encoder-decoder
    from transformers import BartConfig, BartForConditionalGeneration

    torch.manual_seed(0)
    config = _speech_config(BartConfig, max_position_embeddings=64)
    return _seq2seq(BartForConditionalGeneration(config).eval())


def whisper() -> Built:  # speech: float input [batch, mel bins, frames], conv front end
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    torch.manual_seed(0)
    config = _speech_config(WhisperConfig, num_mel_bins=16, max_source_positions=12)
    inputs = {"input_features": _floats(2, 16, 24), "decoder_input_ids": _ids(2, 6)}
    return WhisperForConditionalGeneration(config).eval(), inputs


def speech2text() -> Built:  # speech: float input [batch, frames, features]
    from transformers import Speech2TextConfig, Speech2TextForConditionalGeneration

    torch.manual_seed(0)
    config = _speech_config(
        Speech2TextConfig,
        input_feat_per_channel=16,
        input_channels=1,
        conv_channels=32,
        max_source_positions=64,
    )
    inputs = {"input_features": _floats(2, 20, 16), "decoder_input_ids": _ids(2, 6)}
    return Speech2TextForConditionalGeneration(config).eval(), inputs


def vit() -> Built:  # vision transformer: patch-embedding conv
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    config = ViTConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=4,
        image_size=32,
        patch_size=8,
        num_labels=3,
    )
    return ViTForImageClassification(config).eval(), {"pixel_values": _floats(2, 3, 32, 32)}


def resnet() -> Built:  # convolutions and a linear classifier
    from transformers import ResNetConfig, ResNetForImageClassification

    torch.manual_seed(0)
    config = ResNetConfig(embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], num_labels=3)
    model = ResNetForImageClassification(config).eval()
    return model, {"pixel_values": _floats(2, 3, 32, 32)}


def unet() -> Built:  # diffusion UNet: convolutions, attention blocks, a timestep embedding
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    model = UNet2DModel(
        sample_size=16,
        in_channels=3,
        out_channels=3,
        layers_per_block=1,
        block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
    )
    return model.eval(), {"sample": _floats(2, 3, 16, 16), "timestep": torch.tensor([3, 7])}


def mamba() -> Built:  # state-space model (the sequential scan of transformers' CPU path)
    from transformers import MambaConfig, MambaForCausalLM

    torch.manual_seed(0)
    config = MambaConfig(
        hidden_size=64,
        state_size=8,
        intermediate_size=128,
        num_hidden_layers=1,
        vocab_size=128,
        use_cache=False,
    )
    # the CPU scan unrolls over the sequence in the trace: a short one keeps it small
    return MambaForCausalLM(config).eval(), {"input_ids": _ids(2, 6)}


def mixtral() -> Built:  # mixture of experts: router and grouped-matmul experts
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    config = MixtralConfig(
        **models.DECODER, num_hidden_layers=1, num_local_experts=4, num_experts_per_tok=2
    )
    return _text(MixtralForCausalLM(config).eval())


def _text_with_mask(model: torch.nn.Module) -> Built:
    """Token ids with an attention mask, as a tokenizer gives them."""
    ids = _ids()
    return model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def mistral() -> Built:  # sliding-window attention, a window shorter than the traced sequence
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    config = MistralConfig(**models.DECODER, num_hidden_layers=1, sliding_window=4)
    # with a mask, onnxscript's ORT fusions computed the windowed attention wrong, and
    # lowering/onnx.py keeps the graph unfused
    return _text_with_mask(MistralForCausalLM(config).eval())


def cohere() -> Built:  # parallel attention and MLP, LayerNorm without bias, logit scale
    from transformers import CohereConfig, CohereForCausalLM

    torch.manual_seed(0)
    config = CohereConfig(**models.DECODER, num_hidden_layers=1, pad_token_id=0)
    # with a mask, onnxscript's ORT fusions gave a graph onnxruntime cannot run at batch 3
    # (the verify shape 3x17), and lowering/onnx.py keeps the graph unfused
    return _text_with_mask(CohereForCausalLM(config).eval())


class MatmulLinear(torch.nn.Linear):
    """A Linear whose forward is a matmul with the transposed weight, as some model code
    writes its projections."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x @ self.weight.T
        return out if self.bias is None else out + self.bias


def matmul_llama() -> Built:  # Llama (GQA), every projection a matmul with its weight
    model = models.tiny_llama(layers=1)
    for module in model.modules():
        if type(module) is torch.nn.Linear:
            module.__class__ = MatmulLinear
    return _text(model)


ARCHITECTURES: dict[str, Callable[[], Built]] = {
    f.__name__: f
    for f in (
        qwen2, phi3, gpt_neox, opt, bert, clip_text, t5, bart, whisper,
        speech2text, vit, resnet, unet, mamba, mixtral, mistral, cohere, matmul_llama,
    )
}  # fmt: skip
