"""Merged ONNX export: onnxruntime matches PyTorch (fp32 1e-4, fp16 1e-2) on tiny Llama, GPT-2,
the real MiniLM and a conv net, for every mergeable method; PEFT directory -> ONNX in one
command (against PEFT's own outputs); atomic writes under interruption; clear errors."""

import contextlib
import copy
import io
import logging
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model

import lowering.onnx as lo
import peftc
from passes.cleanup import Cleanup
from passes.merge import MergeError, op_multiset
from peftc import cli
from rewrite.trace import trace
from tests.method_cases import cases
from tests.models import (
    convnet,
    image_inputs,
    minilm_2_layers,
    perturb,
    tiny_gpt2,
    tiny_llama,
    token_inputs,
)

FP32, FP16 = 1e-4, 1e-2
REPO = Path(__file__).resolve().parents[1]
LLAMA_MODULES = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)


def _ort(path, inputs):
    sess = lo.session(path)
    return sess, lo.run_session(sess, inputs)


def _partials(directory: Path) -> list[Path]:
    return [p for p in directory.iterdir() if p.name.endswith(".partial")]


def _cli_export(argv: list[str]) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = cli.main(argv)
    return rc, out.getvalue()


# -- PEFT directory -> ONNX in one command ---------------------------------------------------


@pytest.fixture(scope="module")
def llama_from_peft_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("llama_peft")
    base = tiny_llama(layers=1)
    base.save_pretrained(root / "model")
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False
    )
    peft_model = get_peft_model(copy.deepcopy(base), config).eval()
    peft_model.save_pretrained(root / "adapter")
    out = root / "out" / "model.onnx"
    argv = ["export", "--model", str(root / "model"), "--adapter", str(root / "adapter")]
    rc, printed = _cli_export([*argv, "--out", str(out), "--dtype", "fp16"])
    return base, peft_model, out, rc, printed


def test_peft_dir_to_onnx_llama_fp16(llama_from_peft_dir):
    """fp16: merged in fp32 and cast once; the drift against the unmerged model is reported."""
    base, peft_model, out, rc, printed = llama_from_peft_dir
    assert rc == 0 and out.is_file()
    assert not _partials(out.parent)
    assert "max |onnxruntime - PyTorch|" in printed and "merge drift" in printed
    assert "(fp16," in printed
    sess = lo.session(out)
    assert [i.name for i in sess.get_inputs()] == ["input_ids", "attention_mask"]
    assert [o.name for o in sess.get_outputs()] == ["logits"]
    assert sess.get_inputs()[0].shape == ["batch", "sequence"]  # dynamic axes, named
    x = token_inputs(3, 21, seed=11)
    got = lo.run_session(sess, x)[0]
    assert got.dtype == torch.float16
    with torch.no_grad():
        expected = peft_model(**x).logits
        assert (expected - base(**x).logits).abs().max() > 0.05  # well above the fp16 tolerance
    torch.testing.assert_close(got.float(), expected, atol=FP16, rtol=FP16)
    assert next(base.parameters()).dtype == torch.float32  # the user's model is not cast


def test_peft_dir_to_onnx_minilm(tmp_path):
    base = minilm_2_layers()
    base.save_pretrained(tmp_path / "model")
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=["query", "value"], init_lora_weights=False
    )
    peft_model = get_peft_model(copy.deepcopy(base), config).eval()
    peft_model.save_pretrained(tmp_path / "adapter")
    out = tmp_path / "minilm.onnx"
    argv = ["export", "--model", str(tmp_path / "model"), "--adapter", str(tmp_path / "adapter")]
    rc, _ = _cli_export([*argv, "--out", str(out)])
    assert rc == 0
    sess, got = _ort(out, x := token_inputs(2, 19, vocab=30522, seed=4))
    assert [o.name for o in sess.get_outputs()] == ["last_hidden_state", "pooler_output"]
    with torch.no_grad():
        expected = peft_model(**x)
        assert (expected.last_hidden_state - base(**x).last_hidden_state).abs().max() > 1e-3
    torch.testing.assert_close(got[0], expected.last_hidden_state, atol=FP32, rtol=FP32)
    torch.testing.assert_close(got[1], expected.pooler_output, atol=FP32, rtol=FP32)


# -- every mergeable method -------------------------------------------------------------------


@pytest.fixture(scope="module")
def every_method(tmp_path_factory):
    """Tiny Llama with each registered mergeable method (its case) on a site of its own,
    exported once."""
    mergeable = cases(mergeable=True)
    names = [c.name for c in mergeable]
    # one site per method, on as many layers as that takes (at least two): the model grows
    # with the registry instead of a site count that each new method would outgrow
    layers = max(2, -(-len(names) // len(LLAMA_MODULES)))
    sites = [f"model.layers.{i}.{m}" for i in range(layers) for m in LLAMA_MODULES]
    rules = [c.rule([site]) for site, c in zip(sites, mergeable, strict=False)]
    base = tiny_llama(layers=layers)
    calibration = [token_inputs(2, 16, seed=s) for s in (3, 4)]
    adapted = peftc.compile(base, {"adapters": rules}, token_inputs(2, 16), calibration=calibration)
    perturb(adapted.trainable_parameters(), seed=2)
    path = tmp_path_factory.mktemp("every_method") / "m.onnx"
    report = adapted.eval().export_onnx(str(path))
    return base, adapted, names, path, report


def test_every_mergeable_method_fp32(every_method):
    base, adapted, names, path, report = every_method
    assert {a.method.name for a in adapted.plan} == set(names)
    assert len(report.max_errors) == 2 and max(report.max_errors.values()) <= FP32
    assert report.drift <= 1e-5
    cleaned = trace(base, token_inputs(2, 16), training=False)
    Cleanup()(cleaned)
    assert op_multiset(adapted.merge()) == op_multiset(cleaned.graph)
    x = token_inputs(2, 13, seed=9)
    _, got = _ort(path, x)
    with torch.no_grad():
        expected = adapted(**x).logits
        assert (expected - base(**x).logits).abs().max() > 1e-3
    torch.testing.assert_close(got[0], expected, atol=FP32, rtol=FP32)


def test_llama_rotary_embedding_is_fused(every_method):
    """transformers 5 writes RoPE angles as a Mul; lowering/ort_rope.py rewrites them so that
    onnxruntime's fused rotary replaces rotate-half for q and k of every layer (tiny Llama has
    grouped KV heads, so it lands inside GroupQueryAttention), and the verification at fresh
    shapes (batch 3 and batch 1) still holds."""
    import onnx

    base, _, _, path, report = every_method
    layers = base.config.num_hidden_layers
    assert report.fusions["rope_freqs_as_matmul"] == 1
    assert report.fusions["cos_sin_cache"] == 2 * layers  # q and k of every layer
    assert max(report.max_errors.values()) <= FP32
    nodes = onnx.load(str(path)).graph.node
    gqa = [n for n in nodes if n.op_type == "GroupQueryAttention"]
    assert len(gqa) == layers
    assert [{a.name: a.i for a in n.attribute}.get("do_rotary") for n in gqa] == [1] * layers
    assert not [n for n in nodes if n.op_type in ("Neg", "Slice")]  # no rotate-half left


# -- GPT-2 and a conv net through the API ------------------------------------------------


@pytest.mark.parametrize("name", ["gpt2", "convnet"])
def test_export_api(name, tmp_path, convnet_base, monkeypatch):
    """Also: torch.onnx takes the merged program as it is (rewrite/exported.py), never
    capturing the model again; GPT-2's wte, tied to its head, merges into a weight of its own."""
    if name == "gpt2":
        base, inputs = tiny_gpt2(), token_inputs(2, 16)
        targets = ["c_attn", "c_fc", "c_proj", "wte"]
    else:
        base, inputs, targets = convnet(), image_inputs(2), ["conv1", "conv2", "conv3", "head"]
    spec = {"adapters": [{"method": "lora", "targets": targets, "rank": 4}]}
    adapted = peftc.compile(base, spec, inputs)
    perturb(adapted.trainable_parameters())
    adapted.eval()
    path = tmp_path / "model.onnx"
    captures = []
    real_export = torch.export.export
    monkeypatch.setattr(
        torch.export, "export", lambda *a, **k: captures.append(a) or real_export(*a, **k)
    )
    report = adapted.export_onnx(str(path))
    assert captures == []
    monkeypatch.undo()
    assert max(report.max_errors.values()) <= FP32
    x = image_inputs(3, seed=4) if name == "convnet" else token_inputs(3, 7, seed=4)
    feed = x if isinstance(x, dict) else {"x": x[0]}
    _, got = _ort(path, feed)
    with torch.no_grad():
        expected = adapted(**feed)
        expected = expected if isinstance(expected, torch.Tensor) else expected.logits
        base_out = base(**feed)
        base_out = base_out if isinstance(base_out, torch.Tensor) else base_out.logits
    assert (expected - base_out).abs().max() > 1e-3
    torch.testing.assert_close(got[0], expected, atol=FP32, rtol=FP32)
    if name == "convnet":  # the merged graph costs what the base graph costs
        assert report.nodes == convnet_base[3].nodes
    else:  # the fused attention is flattened again for the Conv1D's Gemm, and kept
        assert report.fusions["mha2"] == 2 and report.fusions_dropped is None


@pytest.fixture(scope="module")
def convnet_base(tmp_path_factory):
    """The conv net's own graph, exported once through the same pipeline."""
    path = tmp_path_factory.mktemp("convnet") / "base.onnx"
    model = convnet()
    feed = {"x": image_inputs(2)[0]}
    report = lo.export_module(lo.base_module(model, image_inputs(2)), feed, path)
    return model, feed, path, report


def test_llama4s_complex_valued_rope_exports(tmp_path):
    """Llama 4 computes RoPE on complex tensors (`torch.polar`, `view_as_complex(q) *
    freqs_cis[:, :, None, :]`); torchlib had no translation for the complex unsqueeze, so the
    export failed. Complex values travel as [..., 2] real tensors (lowering/onnx_complex.py)."""
    from transformers import Llama4ForCausalLM, Llama4TextConfig

    torch.manual_seed(0)
    config = Llama4TextConfig(
        hidden_size=64, intermediate_size=128, intermediate_size_mlp=128, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=128,
        num_local_experts=2, use_cache=False,
    )  # fmt: skip
    base = Llama4ForCausalLM(config).eval()
    spec = {"adapters": [{"method": "lora", "targets": ["q_proj", "k_proj"], "rank": 4}]}
    adapted = peftc.compile(base, spec, token_inputs())
    perturb(adapted.trainable_parameters(), std=0.5)
    path = tmp_path / "model.onnx"
    report = adapted.eval().export_onnx(str(path))
    assert max(report.max_errors.values()) <= FP32
    feed = token_inputs(3, 7, seed=4)
    with torch.no_grad():
        expected, base_out = adapted(**feed).logits, base(**feed).logits
    assert (expected - base_out).abs().max() > 1e-3  # the adapters on q and k change RoPE's input
    torch.testing.assert_close(_ort(path, feed)[1][0], expected, atol=FP32, rtol=FP32)


def test_verify_fails_loudly(convnet_base):
    _, feed, path, _ = convnet_base
    other = convnet(seed=3)
    with pytest.raises(lo.OnnxExportError, match=r"max error .* > tolerance"):
        lo.verify(path, other, feed, FP32)


def test_session_logs_its_provider(convnet_base, caplog):
    _, _, path, _ = convnet_base
    with caplog.at_level(logging.INFO, logger="peftc.onnx"):
        sess = lo.session(path)
    provider = sess.get_providers()[0]
    assert provider in ("CUDAExecutionProvider", "CPUExecutionProvider")
    assert f"uses {provider}" in caplog.text


def test_external_data_for_large_models(tmp_path, monkeypatch):
    monkeypatch.setattr(lo, "EXTERNAL_DATA_BYTES", 0)  # as if the model were over 2 GB
    model = convnet()
    feed = {"x": image_inputs(2)[0]}
    lo.export_module(lo.base_module(model, image_inputs(2)), feed, tmp_path / "big.onnx")
    data = [p for p in tmp_path.iterdir() if p.name != "big.onnx"]
    assert data and all(p.stat().st_size > 0 for p in data) and not _partials(tmp_path)
    _, got = _ort(tmp_path / "big.onnx", feed)
    with torch.no_grad():
        torch.testing.assert_close(got[0], model(feed["x"]), atol=FP32, rtol=FP32)


# -- atomic writes -------------------------------------------------------------------------


def test_killed_export_leaves_no_model(tmp_path):
    """SIGKILL an export after it staged the file but before the rename."""
    path = tmp_path / "model.onnx"
    script = textwrap.dedent(
        f"""
        import sys, time
        sys.path.insert(0, {str(REPO)!r})
        import lowering.onnx as lo
        from tests.models import convnet, image_inputs

        real = lo._save
        def save_then_hang(program, staged, external):
            real(program, staged, external)
            print("STAGED", flush=True)
            time.sleep(300)

        lo._save = save_then_hang
        model = convnet()
        feed = {{"x": image_inputs(2)[0]}}
        lo.export_module(lo.base_module(model, image_inputs(2)), feed, {str(path)!r})
        """
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    try:
        for line in proc.stdout:
            if line.strip() == "STAGED":
                break
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not path.exists()
    assert len(_partials(tmp_path)) == 1  # the kill landed mid-export
    with lo.staged(path) as staged:  # the next export clears the dead one's staging folder
        staged.write_bytes(b"complete")
    assert path.read_bytes() == b"complete"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


# -- errors --------------------------------------------------------------------------------


def test_unmergeable_method_is_refused(unmergeable_method, tmp_path):
    spec = {"adapters": [{"method": unmergeable_method, "targets": ["model.layers.0.mlp.up_proj"]}]}
    adapted = peftc.compile(tiny_llama(layers=1), spec, token_inputs(2, 16)).eval()
    with pytest.raises(MergeError) as err:
        adapted.export_onnx(str(tmp_path / "m.onnx"))
    assert unmergeable_method in str(err.value) and "model.layers.0.mlp.up_proj" in str(err.value)
    assert not any(tmp_path.iterdir())


def test_cli_argument_errors(capsys):
    assert cli.main(["export", "--model", "x:y", "--adapters", "a", "b", "--out", "o.onnx"]) == 2
    assert "--adapters needs --multi" in capsys.readouterr().err
    assert cli.main(["export", "--model", "x:y", "--out", "o.onnx"]) == 2
    assert "give --adapter DIR" in capsys.readouterr().err


def test_fused_graph_off_pytorch_is_dropped_for_the_unfused_one(tmp_path, monkeypatch):
    """A fusion that runs but computes something else (onnxscript's ORT fusions on Mistral's
    sliding window, in the architecture matrix) must not reach the file: the fused graph is
    checked against PyTorch and the unfused one kept. Here a fusion pass that also shifts a
    weight stands in for such a bug. `ort_fusions=False` never runs it."""
    import onnx_ir as ir
    from onnxscript.rewriter import ort_fusions

    real = ort_fusions.optimize_for_ort

    def wrong(model, *args, **kwargs):
        model, fusions = real(model, *args, **kwargs)
        weight = max(model.graph.initializers.values(), key=lambda v: v.const_value.numpy().size)
        weight.const_value = ir.Tensor(weight.const_value.numpy() + 0.5, name=weight.name)
        return model, fusions

    monkeypatch.setattr(ort_fusions, "optimize_for_ort", wrong)
    spec = {"adapters": [{"method": "lora", "targets": ["conv1", "head"], "rank": 2}]}
    adapted = peftc.compile(convnet(), spec, image_inputs(2)).eval()
    report = adapted.export_onnx(str(tmp_path / "m.onnx"))
    assert "off PyTorch (tolerance 0.0001)" in report.fusions_dropped
    assert "ort fusions dropped, exported unfused" in report.summary()
    assert report.fusions == {} and max(report.max_errors.values()) <= FP32
    plain = adapted.export_onnx(str(tmp_path / "plain.onnx"), ort_fusions=False)
    assert plain.fusions_dropped is None and max(plain.max_errors.values()) <= FP32
