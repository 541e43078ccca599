"""One ONNX graph serving several LoRA adapters: with every row on one adapter it equals that
adapter's merged export; with mixed ids each row equals its own adapter (fp32, 1e-4)."""

import contextlib
import io
from types import SimpleNamespace

import pytest
import torch

import lowering.onnx as lo
import peftc
from lowering.multi_adapter import IDS, MultiAdapterError, export_multi
from peftc import cli
from tests.models import perturb, tiny_gpt2, tiny_llama, token_inputs

FP32 = 1e-4
# three adapters with different ranks and targets (rows of a skipped site pass through)
LLAMA_ADAPTERS = [
    {"targets": ["q_proj", "v_proj"], "rank": 4, "alpha": 8},
    {"targets": ["q_proj", "v_proj", "down_proj"], "rank": 8, "alpha": 8},
    {"targets": ["v_proj", "o_proj"], "rank": 2, "alpha": 4, "use_rslora": True},
]


@pytest.fixture(scope="module")
def llama_multi(tmp_path_factory):
    """Three adapters saved in PEFT format, exported as one graph by `peftc export --multi`,
    and each exported merged on its own."""
    root = tmp_path_factory.mktemp("multi")
    base = tiny_llama(layers=1)
    base.save_pretrained(root / "model")
    adapters, dirs = [], []
    for i, rule in enumerate(LLAMA_ADAPTERS):
        adapted = peftc.compile(
            base, {"adapters": [{"method": "lora", **rule}]}, token_inputs(2, 16)
        )
        perturb(adapted.trainable_parameters(), std=0.1, seed=10 + i)
        adapted.eval().save_adapter(root / f"a{i}")
        adapters.append(adapted)
        dirs.append(str(root / f"a{i}"))
    out = root / "multi.onnx"
    argv = ["export", "--model", str(root / "model"), "--adapters", *dirs, "--multi"]
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        rc = cli.main([*argv, "--out", str(out)])
    assert rc == 0, printed.getvalue()
    merged = []
    for i, adapted in enumerate(adapters):
        adapted.export_onnx(str(root / f"merged{i}.onnx"))
        merged.append(lo.session(root / f"merged{i}.onnx"))
    return base, adapters, lo.session(out), merged


def test_multi_graph_inputs(llama_multi):
    _, _, multi, _ = llama_multi
    assert [i.name for i in multi.get_inputs()] == ["input_ids", "attention_mask", IDS]
    assert multi.get_inputs()[2].type == "tensor(int64)"
    assert [o.name for o in multi.get_outputs()] == ["logits"]


@pytest.mark.parametrize("adapter", [0, 1, 2])
def test_single_id_equals_that_adapters_merged_export(llama_multi, adapter):
    base, adapters, multi, merged = llama_multi
    x = token_inputs(3, 13, seed=20 + adapter)
    ids = torch.full((3,), adapter, dtype=torch.int64)
    got = lo.run_session(multi, {**x, IDS: ids})[0]
    expected = lo.run_session(merged[adapter], x)[0]
    with torch.no_grad():
        assert (expected - base(**x).logits).abs().max() > 1e-3
    torch.testing.assert_close(got, expected, atol=FP32, rtol=FP32)


def test_mixed_ids_each_row_gets_its_adapter(llama_multi):
    base, adapters, multi, merged = llama_multi
    x = token_inputs(5, 9, seed=30)
    ids = torch.tensor([2, 0, 1, 1, 0])
    got = lo.run_session(multi, {**x, IDS: ids})[0]
    for row, k in enumerate(ids.tolist()):
        expected = lo.run_session(merged[k], x)[0][row]
        others = [lo.run_session(merged[j], x)[0][row] for j in range(3) if j != k]
        assert all((expected - o).abs().max() > 1e-3 for o in others)  # rows are told apart
        torch.testing.assert_close(got[row], expected, atol=FP32, rtol=FP32)


def test_gpt2_conv1d_rows(tmp_path):
    """GPT-2's Conv1D (addmm over flattened rows) batches per example too; LoRA+ stacks with LoRA."""
    base = tiny_gpt2()
    adapters = []
    for i, (method, targets) in enumerate((("lora", ["c_attn"]), ("loraplus", ["c_attn", "c_fc"]))):
        spec = {"adapters": [{"method": method, "targets": targets, "rank": 4}]}
        adapted = peftc.compile(base, spec, token_inputs(2, 16))
        perturb(adapted.trainable_parameters(), std=0.1, seed=40 + i)
        adapters.append(adapted.eval())
    report = export_multi(adapters, tmp_path / "gpt2_multi.onnx")
    assert max(report.max_errors.values()) <= FP32
    x = token_inputs(2, 10, seed=41)
    got = lo.run_session(
        lo.session(tmp_path / "gpt2_multi.onnx"), {**x, IDS: torch.tensor([1, 0])}
    )[0]
    with torch.no_grad():
        for row, k in enumerate((1, 0)):
            expected = adapters[k](**x).logits[row]
            assert (expected - base(**x).logits[row]).abs().max() > 1e-3
            torch.testing.assert_close(got[row], expected, atol=FP32, rtol=FP32)


def test_non_lora_method_is_refused(llama_multi):
    base, adapters, _, _ = llama_multi
    inputs = token_inputs(2, 16)
    dora = peftc.compile(
        base, {"adapters": [{"method": "dora", "targets": ["q_proj"], "rank": 4}]}, inputs
    )
    with pytest.raises(
        MultiAdapterError, match=r"adapter 1 uses 'dora' at model\.layers\.0\.self_attn\.q_proj"
    ):
        export_multi([adapters[0], dora], "unused.onnx")
    embed = peftc.compile(
        base, {"adapters": [{"method": "lora", "targets": ["embed_tokens"], "rank": 4}]}, inputs
    )
    with pytest.raises(MultiAdapterError, match=r"embedding site model\.embed_tokens"):
        export_multi([embed], "unused.onnx")
    elsewhere = SimpleNamespace(base=tiny_llama(layers=1), plan=adapters[1].plan)
    with pytest.raises(MultiAdapterError, match="same base model"):
        export_multi([adapters[0], elsewhere], "unused.onnx")


def test_biased_linears_keep_ort_fusions(tmp_path):
    """BERT's linears carry biases: the bias is added after the adapter update, so ORT still
    fuses it (BiasGelu, attention bias) and no per-site bias Add is left; rows stay exact."""
    import onnx

    from tests.models import minilm

    base = minilm()
    adapters = []
    for i, targets in enumerate((["query", "value"], ["query", "intermediate.dense"])):
        spec = {"adapters": [{"method": "lora", "targets": targets, "rank": 4}]}
        adapted = peftc.compile(base, spec, token_inputs(2, 16, vocab=1000))
        perturb(adapted.trainable_parameters(), std=0.1, seed=50 + i)
        adapters.append(adapted.eval())
    path = tmp_path / "bert_multi.onnx"
    report = export_multi(adapters, path)
    assert max(report.max_errors.values()) <= FP32
    ops = [n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node]
    assert ops.count("BiasGelu") == base.config.num_hidden_layers
    assert ops.count("Add") <= 4, ops.count("Add")  # mask and embedding adds, no bias adds
    x = token_inputs(2, 10, vocab=1000, seed=51)
    got = lo.run_session(lo.session(path), {**x, IDS: torch.tensor([1, 0])})[0]
    with torch.no_grad():
        for row, k in enumerate((1, 0)):
            expected = adapters[k](**x).last_hidden_state[row]
            assert (expected - base(**x).last_hidden_state[row]).abs().max() > 1e-3
            torch.testing.assert_close(got[row], expected, atol=FP32, rtol=FP32)
