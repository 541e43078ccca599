"""A quantized frozen base (spec `quantize:`): training touches only adapters, the packed
weights are the memory they claim, a compiled step equals eager with each dequantize fused
into one kernel and recomputed in the backward, int8 equals dequantize-then-matmul, merge and
ONNX export (fp32 and int8) check out with onnxruntime, and bad quantize values fail clearly."""

import copy
import re

import pytest
import torch
from torch._inductor.utils import run_and_get_code

import peftc
import rewrite.dequant
from lowering.onnx_int8 import export_int8
from rewrite.codec import dequantize_int8, quantize_int8
from rewrite.spec import SpecError
from tests.models import perturb, restored, tiny_gpt2, tiny_llama, token_inputs

SPEC = {"adapters": [{"method": "lora", "targets": ["q_proj", "v_proj", "down_proj"], "rank": 4}]}


def _inputs(batch=2, seq=12, seed=0):
    x = token_inputs(batch, seq, seed=seed)
    x["labels"] = x["input_ids"]
    return x


def _logits(model, x):
    with torch.no_grad():
        return model(**x).logits


@pytest.fixture(scope="module")
def nf4():
    """tiny Llama (one layer), its q/v/down projections in NF4 (double-quantized), LoRA on them."""
    base = tiny_llama(layers=1)
    fp32 = copy.deepcopy(base)
    quantize = {"kind": "nf4", "double_quant": True}
    adapted = peftc.compile(base, SPEC, _inputs(), quantize=quantize)
    perturb(adapted.trainable_parameters())
    return fp32, adapted


def test_training_changes_only_adapters_and_keeps_no_dequantized_weight(nf4):
    _, adapted = nf4
    with restored(adapted):
        adapted.train()
        before = {k: v.detach().clone() for k, v in adapted.state_dict().items()}
        loss = adapted(**_inputs()).loss
        # autograd holds recipes, not the dequantized weights: none is alive after forward
        assert not rewrite.dequant._MADE
        loss.backward()
        torch.optim.SGD(adapted.trainable_parameters(), lr=0.1).step()
        after = adapted.state_dict()
        changed = {k for k in before if not torch.equal(before[k], after[k])}
        adapter_names = {"adapters." + n for n, _ in adapted.adapters.named_parameters()}
        assert changed and changed <= adapter_names
        assert any(k.startswith("quantized.") for k in before)  # the codes were there, untouched


def test_nf4_weights_hold_under_a_third_of_fp32(nf4):
    _, adapted = nf4
    records = adapted.pipeline.quantized_weights
    assert len(records) == 3  # q, v, down
    fp32_bytes = sum(4 * torch.Size(r.shape).numel() for r in records.values())
    assert adapted.base_weight_bytes(quantized_only=True) <= 0.3 * fp32_bytes
    params = dict(adapted.base.named_parameters())
    for name in records:  # the fp32 weights are gone: each is a one-value shape holder
        assert params[name].untyped_storage().nbytes() <= 4


def _step(adapted, x):
    for p in adapted.trainable_parameters():
        p.grad = None
    loss = adapted(**x).loss
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in adapted.trainable_parameters()]


def _inputs_of(module_code: str) -> dict[str, tuple[tuple[int, ...], str]]:
    """name -> (shape, dtype) of each input of an Inductor output module (its benchmark
    harness lists them); symbolic sizes are skipped (a weight's shape is static)."""
    found = re.findall(r"(\w+) = rand_strided\(\(([\d, ]*)\), .*dtype=torch\.(\w+)\)", module_code)
    return {n: (tuple(int(d) for d in dims.split(",") if d.strip()), t) for n, dims, t in found}


def test_compiled_step_equals_eager_and_recomputes_the_fused_dequantize():
    adapted = peftc.compile(tiny_llama(layers=1), SPEC, _inputs(), quantize="nf4").train()
    perturb(adapted.trainable_parameters())
    x = _inputs(2, 12, seed=5)
    loss, grads = _step(adapted, x)  # eager: the custom ops, recipes in the backward
    adapted.compile_for_training()
    (compiled_loss, compiled_grads), code = run_and_get_code(lambda: _step(adapted, x))
    assert all(g.abs().max() > 0 for g in grads)
    torch.testing.assert_close(compiled_loss, loss, atol=1e-5, rtol=1e-5)
    for ours, eager in zip(compiled_grads, grads, strict=True):
        torch.testing.assert_close(ours, eager, atol=1e-5, rtol=1e-5)
    forward, backward = sorted(code, key=lambda c: "tangents_" in c)
    assert "tangents_" in backward and "tangents_" not in forward
    weights = {tuple(r.shape) for r in adapted.pipeline.quantized_weights.values()}
    assert len(weights) == 3  # q (64x64), v (32x64), down (64x96): one shape each
    # no opaque dequantize call is left: each weight is unpacked, looked up and scaled in one
    # generated kernel (the matmul stays an extern mm on CPU: see the README's QLoRA section)
    assert "peftc.dequantize" not in forward + backward
    kernels = set(re.findall(r"^\s+(cpp_fused\w*rshift\w*)\(", forward, re.M))
    assert len(kernels) == 3
    # the backward keeps no fp32 weight: of what the forward saves for it (inputs other than
    # the graph's own, primals_*), none has a weight's shape; it dequantizes down_proj again
    # from its uint8 codes (the input gradient through q and v is not needed: nothing
    # upstream trains)
    inputs = _inputs_of(backward)
    saved = {n: v for n, v in inputs.items() if not n.startswith("primals_")}
    assert saved and not [
        n for n, (shape, _) in saved.items() if shape in weights or shape[::-1] in weights
    ]
    assert re.search(r"^\s+cpp_fused\w*rshift\w*\(", backward, re.M)
    assert (64 * 96 // 2,) in {shape for shape, dtype in inputs.values() if dtype == "uint8"}


def test_a_conv1d_weight_is_quantized_as_its_transpose_and_trains_compiled_and_merges():
    """GPT-2's Conv1D (an addmm site) stores its weight [in, out]; peftc quantizes the [out, in]
    transpose, the layout bitsandbytes quantizes (test_quantize_bnb's gpt2_fp32 case gives PEFT
    on bitsandbytes' logits from it), and the graph dequantizes, then transposes. A compiled
    step equals the eager one, and merge() (dense weights back in [in, out]) equals the graph."""
    spec = {"adapters": [{"method": "lora", "targets": ["c_attn", "c_fc"], "rank": 4}]}
    base = tiny_gpt2(layers=1)  # one block: the compile is the test's cost
    for module in base.modules():  # GPT-2's dropouts (0.1): eager and compiled draw apart
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    adapted = peftc.compile(base, spec, _inputs(), quantize="nf4").train()
    record = adapted.pipeline.quantized_weights["transformer.h.0.attn.c_attn.weight"]
    assert record.transposed and record.shape == (192, 64)  # Conv1D(192, 64) holds [64, 192]
    perturb(adapted.trainable_parameters())
    x = _inputs(2, 12, seed=5)
    loss, grads = _step(adapted, x)
    adapted.compile_for_training()
    compiled_loss, compiled_grads = _step(adapted, x)
    assert all(g.abs().max() > 0 for g in grads)
    torch.testing.assert_close(compiled_loss, loss, atol=1e-5, rtol=1e-5)
    for ours, eager in zip(compiled_grads, grads, strict=True):
        torch.testing.assert_close(ours, eager, atol=1e-5, rtol=1e-5)
    adapted.eval()
    ours = _logits(adapted, x)
    with torch.no_grad():
        assert (adapted.merge()(**x).logits - ours).abs().max() < 1e-5


def test_merge_then_fp32_and_int8_onnx_of_nf4(nf4, tmp_path):
    fp32, adapted = nf4
    adapted.eval()
    x = _inputs(3, 9, seed=3)
    ours = _logits(adapted, x)
    assert (ours - _logits(fp32, x)).abs().max() > 1e-3
    merged = adapted.merge()  # dequantized in fp32, merged, cast once
    with torch.no_grad():
        torch.testing.assert_close(merged(**x).logits, ours, atol=1e-5, rtol=1e-5)
    # fusions off: the unfused graph exports in a third of the time, the checks are the same
    report = export_int8(adapted, tmp_path / "m.onnx", repeats=3, ort_fusions=False)
    fp32_report = report.fp32  # verified against PyTorch with onnxruntime at two fresh shapes
    assert fp32_report.quantized == "nf4" and fp32_report.drift < 1e-4
    assert "quantized (nf4) training model" in fp32_report.summary()
    assert max(fp32_report.max_errors.values()) <= fp32_report.tolerance
    assert report.bytes_int8 < report.bytes_fp32
    assert 0 < report.drift < 0.5  # onnxruntime's dynamic int8, against the fp32 file
    assert report.int8_ms > 0 and report.fp32_ms > 0


def test_int8_equals_dequantize_then_matmul():
    base = tiny_llama(layers=1)
    reference = copy.deepcopy(base)
    adapted = peftc.compile(base, SPEC, _inputs(), quantize="int8").eval()
    perturb(adapted.trainable_parameters())
    # the reference: the same model with each targeted weight replaced by codes * absmax / 127
    for name, record in adapted.pipeline.quantized_weights.items():
        W = dict(reference.named_parameters())[name]
        q = quantize_int8(W)
        assert torch.equal(q.tensors["codes"], record.tensors["codes"])
        err = (dequantize_int8(q.tensors, W.dtype) - W).abs().max(dim=1)[0]
        assert (err <= q.tensors["absmax"] / 254 + 1e-7).all()  # half a step per row
        with torch.no_grad():
            W.copy_(dequantize_int8(record.tensors, W.dtype))
    ref = peftc.compile(reference, SPEC, _inputs()).eval()
    with torch.no_grad():
        for p, q in zip(ref.trainable_parameters(), adapted.trainable_parameters(), strict=True):
            p.copy_(q)
    x = _inputs(3, 9, seed=3)
    assert (_logits(adapted, x) - _logits(tiny_llama(layers=1), x)).abs().max() > 1e-3
    torch.testing.assert_close(_logits(adapted, x), _logits(ref, x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "quantize, message",
    [
        ("nf5", "unknown kind 'nf5'"),
        ({"kind": "nf4", "blocksize": 48}, "blocksize must be one of"),
        ({"kind": "nf4", "block_size": 64}, "did you mean 'blocksize'"),
        ({"kind": "int8", "double_quant": True}, "nf4 options"),
        ({"kind": "nf4", "blocksize": 4096}, "not a multiple of the nf4 blocksize 4096"),
        ({"kind": "nf4", "compute_dtype": "bfloat16"}, "cast the model"),
    ],
)
def test_bad_quantize_values_name_the_fix(quantize, message):
    with pytest.raises(SpecError, match=message):
        peftc.compile(tiny_llama(layers=1), SPEC, _inputs(), quantize=quantize)
