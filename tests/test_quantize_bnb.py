"""QLoRA against PEFT on bitsandbytes: the NF4 codec bit for bit, a bitsandbytes model read as
it is, and an fp32 model quantized by peftc, each giving PEFT's logits (fp32, 1e-4)."""

import copy

import bitsandbytes.functional as bnbf
import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModel, AutoModelForCausalLM, BitsAndBytesConfig

import peftc
from rewrite.codec import dequantize, dynamic_map, quantize_nf4
from tests.models import tiny_bert, tiny_llama, token_inputs

TOL = 1e-4  # fp32 logits: same dequantized weights, matmuls in another order


def test_nf4_codec_is_bitsandbytes():
    W = torch.randn(96, 64, generator=torch.Generator().manual_seed(0)) * 0.05
    packed, state = bnbf.quantize_4bit(W, blocksize=64, quant_type="nf4")
    ours = quantize_nf4(W, 64)
    assert torch.equal(ours.tensors["codes"], packed.reshape(-1))  # packing order
    assert torch.equal(ours.tensors["absmax"], state.absmax)
    assert torch.equal(dequantize(ours), bnbf.dequantize_4bit(packed, state))
    assert torch.equal(dynamic_map(), bnbf.create_dynamic_map())
    # double quantization: offset and absmax2 are bnb's exactly; bnb's C binary search picks
    # the other neighbour for ~0.1% of the 8-bit absmax codes, so those are compared loosely
    packed2, state2 = bnbf.quantize_4bit(
        W, blocksize=64, compress_statistics=True, quant_type="nf4"
    )
    ours2 = quantize_nf4(W, 64, double_quant=True)
    assert torch.equal(ours2.tensors["codes"], packed2.reshape(-1))
    assert torch.equal(ours2.tensors["absmax2"], state2.state2.absmax)
    assert ours2.tensors["offset"].item() == state2.offset.item()
    assert (ours2.tensors["absmax"].int() - state2.absmax.int()).abs().max() <= 1
    ref = bnbf.dequantize_4bit(packed2, state2)
    assert (dequantize(ours2) - ref).abs().max() <= 1e-3 * W.abs().max()


def _bnb(model, directory, double_quant, auto=AutoModelForCausalLM):
    model.save_pretrained(directory)
    config = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=double_quant
    )
    return auto.from_pretrained(directory, quantization_config=config, device_map="cpu").eval()


def _logits(model, x):
    with torch.no_grad():
        out = model(**x)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


CASES = {
    # (model, auto class, LoRA targets, double quantization, peftc reads the bnb model itself)
    "llama_bnb": (tiny_llama, AutoModelForCausalLM, ["q_proj", "v_proj", "down_proj"], True, True),
    "bert_fp32": (tiny_bert, AutoModel, ["query", "value", "dense"], False, False),
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
        ours_base, quantize = copy.deepcopy(fp32), {"kind": "nf4", "targets": "all-linear"}
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
