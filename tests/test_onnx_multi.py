"""One ONNX graph serving several adapters of the batchable methods: with every row on one
adapter it equals that adapter (PEFT's model, for the PEFT directories given to the CLI); with
mixed ids each row equals its own adapter (fp32, 1e-4)."""

import contextlib
import copy
import io
from types import SimpleNamespace

import pytest
import torch
from peft import LoraConfig, get_peft_model

import lowering.onnx as lo
import peftc
from lowering.multi_adapter import IDS, MultiAdapterError, export_multi
from peftc import cli
from tests.method_cases import cases
from tests.models import minilm_2_layers, perturb, tiny_gpt2, tiny_llama, token_inputs

FP32 = 1e-4
# three LoRA adapters with different ranks and targets (rows of a skipped site pass through)
LLAMA_ADAPTERS = [
    {"target_modules": ["q_proj", "v_proj"], "r": 4, "lora_alpha": 8},
    {"target_modules": ["q_proj", "v_proj", "down_proj"], "r": 8, "lora_alpha": 8},
    {"target_modules": ["v_proj", "o_proj"], "r": 2, "lora_alpha": 4, "use_rslora": True},
]


def _logits(model, x):
    with torch.no_grad():
        return model(**x).logits


@pytest.fixture(scope="module")
def llama_multi(tmp_path_factory):
    """Three adapters saved by PEFT, exported as one graph by `peftc export --multi`; the PEFT
    models are the references."""
    root = tmp_path_factory.mktemp("multi")
    base = tiny_llama(layers=1)
    base.save_pretrained(root / "model")
    adapters, dirs = [], []
    for i, options in enumerate(LLAMA_ADAPTERS):
        peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(**options))
        perturb([p for p in peft_model.parameters() if p.requires_grad], std=0.1, seed=10 + i)
        peft_model.eval().save_pretrained(root / f"a{i}")
        adapters.append(peft_model)
        dirs.append(str(root / f"a{i}"))
    out = root / "multi.onnx"
    argv = ["export", "--model", str(root / "model"), "--adapters", *dirs, "--multi"]
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        rc = cli.main([*argv, "--out", str(out)])
    assert rc == 0, printed.getvalue()
    return base, adapters, lo.session(out)


def test_multi_graph_inputs(llama_multi):
    _, _, multi = llama_multi
    assert [i.name for i in multi.get_inputs()] == ["input_ids", "attention_mask", IDS]
    assert multi.get_inputs()[2].type == "tensor(int64)"
    assert [o.name for o in multi.get_outputs()] == ["logits"]


@pytest.mark.parametrize("adapter", [0, 1, 2])
def test_single_id_equals_that_adapter(llama_multi, adapter):
    base, adapters, multi = llama_multi
    x = token_inputs(3, 13, seed=20 + adapter)
    ids = torch.full((3,), adapter, dtype=torch.int64)
    got = lo.run_session(multi, {**x, IDS: ids})[0]
    expected = _logits(adapters[adapter], x)
    assert (expected - _logits(base, x)).abs().max() > 1e-3
    torch.testing.assert_close(got, expected, atol=FP32, rtol=FP32)


def test_mixed_ids_each_row_gets_its_adapter(llama_multi):
    base, adapters, multi = llama_multi
    x = token_inputs(5, 9, seed=30)
    ids = torch.tensor([2, 0, 1, 1, 0])
    got = lo.run_session(multi, {**x, IDS: ids})[0]
    each = [_logits(a, x) for a in adapters]
    for row, k in enumerate(ids.tolist()):
        expected = each[k][row]
        others = [each[j][row] for j in range(3) if j != k]
        assert all((expected - o).abs().max() > 1e-3 for o in others)  # rows are told apart
        torch.testing.assert_close(got[row], expected, atol=FP32, rtol=FP32)


def test_gpt2_conv1d_rows_of_every_batchable_method(tmp_path):
    """GPT-2's Conv1D (addmm over flattened rows) batches per example too; every batchable
    method (its case) stacks with the others, on different targets."""
    base = tiny_gpt2()
    targets = (["c_attn"], ["c_attn", "c_fc"])
    chosen = cases(batchable=True)
    plan = [(c, targets[i % 2]) for i, c in enumerate(chosen)]
    if len(plan) < 2:  # one batchable method: two adapters of it
        plan.append((chosen[0], targets[1]))
    adapters = []
    for i, (c, t) in enumerate(plan):
        adapted = peftc.compile(base, c.spec(t), token_inputs(2, 16), calibration=c.calibration)
        perturb(adapted.trainable_parameters(), std=0.1, seed=40 + i)
        adapters.append(adapted.eval())
    report = export_multi(adapters, tmp_path / "gpt2_multi.onnx")
    assert max(report.max_errors.values()) <= FP32
    n = len(adapters)
    x = token_inputs(n, 10, seed=41)
    ids = torch.tensor([(row + 1) % n for row in range(n)])  # no row on its own index
    got = lo.run_session(lo.session(tmp_path / "gpt2_multi.onnx"), {**x, IDS: ids})[0]
    plain = _logits(base, x)
    for row, k in enumerate(ids.tolist()):
        expected = _logits(adapters[k], x)[row]
        assert (expected - plain[row]).abs().max() > 1e-3
        torch.testing.assert_close(got[row], expected, atol=FP32, rtol=FP32)


def test_unbatchable_method_embedding_site_and_other_base_are_refused():
    base, inputs = tiny_llama(layers=1), token_inputs(2, 16)
    lora = peftc.compile(
        base, {"adapters": [{"method": "lora", "targets": ["v_proj"], "rank": 4}]}, inputs
    )
    other = cases(batchable=False)[0]
    unbatchable = peftc.compile(base, other.spec(["q_proj"]), inputs, calibration=other.calibration)
    with pytest.raises(
        MultiAdapterError,
        match=rf"adapter 1 uses '{other.name}' at model\.layers\.0\.self_attn\.q_proj",
    ):
        export_multi([lora, unbatchable], "unused.onnx")
    embed = peftc.compile(
        base, {"adapters": [{"method": "lora", "targets": ["embed_tokens"], "rank": 4}]}, inputs
    )
    with pytest.raises(MultiAdapterError, match=r"embedding site model\.embed_tokens"):
        export_multi([embed], "unused.onnx")
    elsewhere = SimpleNamespace(base=tiny_llama(layers=1), plan=lora.plan)
    with pytest.raises(MultiAdapterError, match="same base model"):
        export_multi([lora, elsewhere], "unused.onnx")


def test_biased_linears_keep_ort_fusions(tmp_path):
    """BERT's linears carry biases: the bias is added after the adapter update, so ORT still
    fuses it (BiasGelu, attention bias) and no per-site bias Add is left; rows stay exact."""
    import onnx

    base = minilm_2_layers()
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
