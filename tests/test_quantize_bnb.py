"""QLoRA against PEFT on bitsandbytes: the NF4 codec bit for bit, a bitsandbytes model read as
it is, and an fp32 model quantized by peftc, each giving PEFT's logits (fp32, 1e-4)."""

import copy
from functools import partial

import bitsandbytes.functional as bnbf
import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModel, AutoModelForCausalLM, BitsAndBytesConfig

import peftc
from rewrite.codec import dequantize, dynamic_map, quantize_nf4
from tests.models import tiny_bert, tiny_gpt2, tiny_llama, token_inputs

TOL = 1e-4  # fp32 logits: same dequantized weights, matmuls in another order


# (rows, cols, blocksize, scale): 96 blocks (one partial absmax block of 256); 1024 blocks
# (four full ones); 600 blocks of 128 at a larger scale (three, the last partial). Columns are
# a multiple of the blocksize: bitsandbytes' AVX512 CPU kernels block each row on its own
# (so do its packed Linear4bit path), its other kernels and peftc block the flat tensor, and
# the two agree only there (bitsandbytes 0.50 on AVX512-BF16 CPUs)
CODEC_CASES = [(96, 64, 64, 0.05), (512, 128, 64, 0.02), (600, 128, 128, 3.0)]


def test_nf4_codec_is_bitsandbytes():
    nearest_differs = 0
    for rows, cols, blocksize, scale in CODEC_CASES:
        W = torch.randn(rows, cols, generator=torch.Generator().manual_seed(rows)) * scale
        packed, state = bnbf.quantize_4bit(W, blocksize=blocksize, quant_type="nf4")
        ours = quantize_nf4(W, blocksize)
        assert torch.equal(ours.tensors["codes"], packed.reshape(-1))  # packing order
        assert torch.equal(ours.tensors["absmax"], state.absmax)
        assert torch.equal(dequantize(ours), bnbf.dequantize_4bit(packed, state))
        # double quantization, bit for bit: the 8-bit absmax codes, their map, scales, offset
        packed2, state2 = bnbf.quantize_4bit(
            W, blocksize=blocksize, compress_statistics=True, quant_type="nf4"
        )
        ours2 = quantize_nf4(W, blocksize, double_quant=True)
        assert torch.equal(ours2.tensors["codes"], packed2.reshape(-1))
        assert torch.equal(ours2.tensors["code2"], state2.state2.code)
        assert torch.equal(ours2.tensors["absmax2"], state2.state2.absmax)
        assert ours2.tensors["offset"].item() == state2.offset.item()
        assert torch.equal(ours2.tensors["absmax"], state2.absmax)
        assert torch.equal(dequantize(ours2), bnbf.dequantize_4bit(packed2, state2))
        nearest = _nearest_codes(state.absmax - state2.offset, state2.state2)
        nearest_differs += int((nearest != state2.absmax.long()).sum())
    # the cases reach values where bnb's table and the nearest code disagree, so the equality
    # above pins bnb's rule, not only nearest rounding
    assert nearest_differs > 0
    assert torch.equal(dynamic_map(), bnbf.create_dynamic_map())


def _nearest_codes(values: torch.Tensor, state2) -> torch.Tensor:
    """The nearest-code 8-bit index of each value, blocks of 256 scaled by bnb's absmax2."""
    n = values.numel()
    blocks = torch.nn.functional.pad(values, (0, (-n) % 256)).reshape(-1, 256)
    normed = (blocks / state2.absmax.view(-1, 1)).reshape(-1)[:n]
    return (normed.view(-1, 1) - state2.code.view(1, -1)).abs().argmin(dim=1)


def _bnb(model, directory, double_quant, auto=AutoModelForCausalLM):
    model.save_pretrained(directory)
    config = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=double_quant
    )
    model = auto.from_pretrained(directory, quantization_config=config, device_map="cpu").eval()
    for module in model.modules():
        # on AVX512-BF16 CPUs bitsandbytes' eval forward repacks the weight and multiplies in
        # bf16 (3e-3 off the fp32 logits); the oracle is its fp32 dequantize-and-matmul
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    return model


def _logits(model, x):
    with torch.no_grad():
        out = model(**x)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


# in_features a multiple of the blocksize everywhere, as bitsandbytes' CPU kernels need (above)
llama, bert = partial(tiny_llama, intermediate=128), partial(tiny_bert, hidden=64)
CASES = {
    # (model, auto class, LoRA targets, double quantization, peftc reads the bnb model itself)
    "llama_bnb": (llama, AutoModelForCausalLM, ["q_proj", "v_proj", "down_proj"], True, True),
    "llama_fp32": (
        llama,
        AutoModelForCausalLM,
        ["q_proj", "v_proj", "down_proj"],
        True,
        False,
    ),
    "bert_bnb": (bert, AutoModel, ["query", "value", "dense"], False, True),
    # GPT-2's Conv1D weights ([in, out]) arrive transposed into Linear4bit's [out, in] layout
    "gpt2_bnb": (tiny_gpt2, AutoModelForCausalLM, ["c_attn", "c_fc", "c_proj"], False, True),
    "gpt2_fp32": (tiny_gpt2, AutoModelForCausalLM, ["c_attn", "c_fc", "c_proj"], False, False),
    "bert_fp32": (bert, AutoModel, ["query", "value", "dense"], False, False),
}


@pytest.fixture(scope="module", params=list(CASES))
def pair(request, tmp_path_factory):
    """(PEFT on the bitsandbytes model, peftc from its checkpoint, the fp32 model, case)."""
    make, auto, targets, double_quant, from_bnb = CASES[request.param]
    tmp_path = tmp_path_factory.mktemp(request.param)
    fp32 = make()
    theirs_base = _bnb(fp32, tmp_path / "base", double_quant, auto)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False)
    peft_model = get_peft_model(theirs_base, config).eval()
    peft_model.save_pretrained(tmp_path / "adapter")
    x = token_inputs(2, 12)
    if from_bnb:  # the bitsandbytes model as it is: its NF4 state, not re-quantized
        ours_base, quantize = _bnb(fp32, tmp_path / "base2", double_quant, auto), None
    else:  # the fp32 model, quantized by peftc as bitsandbytes would
        ours_base, quantize = (
            copy.deepcopy(fp32),
            {"kind": "nf4", "targets": "all-linear", "double_quant": double_quant},
        )
    adapted = peftc.from_peft(ours_base, tmp_path / "adapter", x, quantize=quantize).eval()
    return peft_model, adapted, fp32, request.param


def test_from_peft_matches_peft_on_bitsandbytes(pair):
    peft_model, adapted, fp32, _ = pair
    assert adapted.pipeline.quantized_weights  # the base really is quantized
    fresh = token_inputs(3, 9, seed=4)
    expected = _logits(peft_model, fresh)
    assert (expected - _logits(fp32, fresh)).abs().max() > 1e-3  # adapters and NF4 both act
    with peft_model.disable_adapter():
        assert (expected - _logits(peft_model, fresh)).abs().max() > 1e-3  # the adapter acts
    torch.testing.assert_close(_logits(adapted, fresh), expected, atol=TOL, rtol=TOL)


@pytest.mark.parametrize("pair", ["llama_bnb"], indirect=True)
def test_generate_on_the_quantized_base_is_peft_on_bitsandbytes(pair):
    peft_model, adapted, _, _ = pair
    ids = token_inputs(1, 6, seed=2)["input_ids"]
    ours = adapted.generate(input_ids=ids, max_new_tokens=6, do_sample=False)
    with torch.no_grad():
        theirs = peft_model.generate(input_ids=ids, max_new_tokens=6, do_sample=False)
        with peft_model.disable_adapter():
            plain = peft_model.generate(input_ids=ids, max_new_tokens=6, do_sample=False)
    assert not torch.equal(theirs, plain)  # the adapter changes the tokens
    assert torch.equal(ours, theirs)
    params = dict(adapted.base.named_parameters())
    for name in adapted.pipeline.quantized_weights:  # the shape holders are back
        assert params[name].untyped_storage().nbytes() <= 4
