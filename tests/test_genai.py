"""KV-cache decoder packages for onnxruntime-genai (lowering/genai.py, `peftc export --genai`).

Oracle: transformers' greedy `generate` on PEFT's merged model (`merge_and_unload`) of the same
adapter; every package is run by onnxruntime-genai's own greedy search from token ids. Each
case first checks that the adapter changes the tokens, so equal tokens cannot pass vacuously.
Greedy tokens are compared exactly, in fp32 and fp16 (the tiny models' adapters are perturbed
to std 0.5, so the top logit leads by far more than either dtype's error).
"""

import copy
import json

import numpy as np
import onnx
import onnxruntime_genai as og
import pytest
import torch

import peftc
from lowering.genai import GenaiError, export_genai, genai_tokens, hf_tokens
from peftc.cli import main
from tests.models import perturb, save_word_tokenizer, tiny_llama, tiny_qwen2, token_inputs

PROMPT = [5, 17, 99, 42, 8, 63]
NEW = 10
TARGETS = ["q_proj", "k_proj", "v_proj", "down_proj"]


def adapted_pair(build, seeds=(1, 2)):
    """The base model and LoRA adapters on it, each with its own perturbed values."""
    base = build()
    spec = {"adapters": [{"method": "lora", "targets": TARGETS, "rank": 4}]}
    adapters = []
    for seed in seeds:
        adapted = peftc.compile(base, spec, token_inputs())
        perturb(adapted.trainable_parameters(), std=0.5, seed=seed)
        adapters.append(adapted.eval())
    return base, adapters


def peft_tokens(base, adapted, tmp_path, dtype=torch.float32) -> list[int]:
    """The oracle: PEFT loads the saved adapter, merges it, and generates greedily."""
    from peft import PeftModel

    directory = tmp_path / f"peft-{id(adapted)}"
    adapted.save_adapter(str(directory))
    merged = PeftModel.from_pretrained(copy.deepcopy(base), str(directory)).merge_and_unload()
    return hf_tokens(merged.to(dtype).eval(), [PROMPT], NEW)[0]


@pytest.fixture(scope="module")
def llama():
    return adapted_pair(tiny_llama)


@pytest.fixture(scope="module")
def qwen2():
    return adapted_pair(lambda: tiny_qwen2(layers=1))  # one layer: each export costs per layer


def graph_io(path) -> tuple[list[str], list[str], set[str]]:
    model = onnx.load(str(path), load_external_data=False)
    return (
        [i.name for i in model.graph.input],
        [o.name for o in model.graph.output],
        {n.op_type for n in model.graph.node},
    )


def test_cli_writes_a_merged_package_that_genai_runs_with_peft_tokens(qwen2, tmp_path):
    """Qwen2: q/k/v biases and a tied head, fp32."""
    base, (adapted, _) = qwen2
    model_dir, adapter_dir, out = tmp_path / "hf", tmp_path / "adapter", tmp_path / "pkg"
    base.save_pretrained(str(model_dir))
    save_word_tokenizer(model_dir)
    adapted.save_adapter(str(adapter_dir))

    assert main(["export", "--model", str(model_dir), "--adapter", str(adapter_dir), "--genai",
                 "--out", str(out)]) == 0  # fmt: skip

    assert {"model.onnx", "genai_config.json", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    inputs, outputs, ops = graph_io(out / "model.onnx")
    assert inputs == [
        "input_ids",
        "attention_mask",
        "past_key_values.0.key",
        "past_key_values.0.value",
    ]
    assert outputs == ["logits", "present.0.key", "present.0.value"]
    assert "GroupQueryAttention" in ops  # the fused attention the model builder also uses
    # as the builder writes it: q, k, v packed into one MatMul (biases into one Add), and the
    # cache read by the attention alone, so genai may share one buffer for past and present
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
    (gqa,) = [n for n in graph.node if n.op_type == "GroupQueryAttention"]
    assert list(gqa.input[1:3]) == ["", ""]
    assert [n.op_type for n in graph.node if set(n.input) & {"past_key_values.0.key"}] == [
        "GroupQueryAttention"
    ]
    config = json.loads((out / "genai_config.json").read_text())
    assert config["search"]["past_present_share_buffer"] is True
    model = config["model"]
    assert (model["type"], model["decoder"]["num_key_value_heads"]) == ("qwen2", 2)

    got = genai_tokens(out, [PROMPT], NEW)[0]
    assert got != hf_tokens(base, [PROMPT], NEW)[0]  # the adapter changes the tokens
    assert got == peft_tokens(base, adapted, tmp_path)
    assert len(got) == len(PROMPT) + NEW


def test_export_genai_fp16_equals_peft_merged_in_fp16(llama, tmp_path):
    base, (adapted, _) = llama
    report = adapted.export_genai(str(tmp_path / "pkg"), dtype="fp16")
    want = peft_tokens(base, adapted, tmp_path, torch.float16)
    assert want != hf_tokens(copy.deepcopy(base).half(), [PROMPT], NEW)[0]
    assert genai_tokens(tmp_path / "pkg", [PROMPT], NEW)[0] == want
    assert len(report.tokens["merged"]) > 8  # the export checked its own prompt too
    model = onnx.load(str(tmp_path / "pkg" / "model.onnx"), load_external_data=False)
    assert model.graph.input[2].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16


@pytest.fixture(params=["llama", "qwen2"])
def pair(request):
    return request.getfixturevalue(request.param)


def test_adapter_files_switch_per_generator_and_match_each_merged_model(pair, tmp_path):
    """onnxruntime-genai's way: LoRA tensors as graph inputs, one .onnx_adapter per adapter."""
    base, adapters = pair
    out = tmp_path / "pkg"
    export_genai(adapters, out, mode="inputs", names=["math", "chat"])
    inputs, _, _ = graph_io(out / "model.onnx")
    adapter_inputs = [n for n in inputs if ".lora_" in n]
    layers = base.config.num_hidden_layers
    assert len(adapter_inputs) == 2 * layers * len(TARGETS)  # A and B per site
    file_params = og_adapter_names(out / "math.onnx_adapter")
    assert file_params == set(adapter_inputs)  # the names in the graph and in the files match

    model = og.Model(str(out))
    loaded = og.Adapters(model)
    for name in ("math", "chat"):
        loaded.load(str(out / f"{name}.onnx_adapter"), name)
    math = run_with(model, (loaded, "math"))
    chat = run_with(model, (loaded, "chat"))
    assert math != chat  # switching the adapter changes the tokens
    assert math == peft_tokens(base, adapters[0], tmp_path)
    assert chat == peft_tokens(base, adapters[1], tmp_path)
    assert run_with(model, None) == hf_tokens(base, [PROMPT], NEW)[0]  # none active: the base


def og_adapter_names(path) -> set[str]:
    import onnxruntime as ort

    return set(ort.AdapterFormat.read_adapter(str(path)).get_parameters())


def run_with(model, adapter) -> list[int]:
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(PROMPT) + NEW, do_sample=False)
    generator = og.Generator(model, params)
    if adapter is not None:
        generator.set_active_adapter(*adapter)
    generator.append_tokens(np.asarray([PROMPT], dtype=np.int32))
    while not generator.is_done():
        generator.generate_next_token()
    return [int(t) for t in generator.get_sequence(0)]


def test_rows_of_one_batch_decode_with_their_own_adapters(pair, tmp_path):
    """peftc's per-row mixing in the KV-cache decoder: adapter_ids picks each row's adapter."""
    base, adapters = pair
    out = tmp_path / "pkg"
    export_genai(adapters, out, mode="mixed")
    assert "adapter_ids" in graph_io(out / "model.onnx")[0]
    ids = np.array([1, 0, 1], dtype=np.int64)
    rows = genai_tokens(out, [PROMPT] * 3, NEW, inputs={"adapter_ids": ids})
    want = [peft_tokens(base, a, tmp_path) for a in adapters]
    assert want[0] != want[1]
    assert rows == [want[1], want[0], want[1]]


def test_bad_requests_say_what_to_do(llama, tmp_path):
    base, adapters = llama
    with pytest.raises(ValueError, match="mode='inputs'"):
        export_genai(adapters, tmp_path / "a", mode="merged")
    with pytest.raises(ValueError, match="mode must be one of"):
        export_genai(adapters[0], tmp_path / "b", mode="stacked")
    with pytest.raises(GenaiError, match="decoder LLMs"):
        export_genai(peftc.compile(torch.nn.Sequential(torch.nn.Linear(4, 4)),
                                   {"adapters": [{"method": "lora", "targets": ["0"], "rank": 2}]},
                                   (torch.randn(2, 4),)), tmp_path / "c")  # fmt: skip
    code = main(["export", "--model", "m", "--adapter", "a", "--adapters", "b", "--genai",
                 "--out", str(tmp_path / "d")])  # fmt: skip
    assert code == 2


def test_missing_onnxruntime_genai_names_the_install(llama, tmp_path, monkeypatch):
    import builtins

    real = builtins.__import__

    def no_genai(name, *args, **kwargs):
        if name == "onnxruntime_genai":
            raise ImportError("No module named 'onnxruntime_genai'")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_genai)
    with pytest.raises(GenaiError, match="pip install --no-deps onnxruntime-genai"):
        genai_tokens(tmp_path, [PROMPT], NEW)


def test_slices_of_phi3s_packed_qkv_decode_per_row_in_the_kv_cache_graph(tmp_path):
    """Phi-3's packed qkv_proj: one adapter on its q and v slices, one on the whole module,
    mixed per row in the KV-cache decoder; each row's tokens are transformers' generate on
    that adapter's merged model (verified inside the export), and the two differ."""
    from tests.models import tiny_phi3

    base = tiny_phi3()
    adapters = []
    for seed, targets in ((1, ["*.qkv_proj[q]", "*.qkv_proj[v]"]), (2, ["qkv_proj"])):
        spec = {"adapters": [{"method": "lora", "targets": targets, "rank": 4}]}
        adapted = peftc.compile(base, spec, token_inputs()).eval()
        perturb(adapted.trainable_parameters(), std=0.1, seed=seed)
        adapters.append(adapted)
    assert adapters[0].plan.assignments[0].site.part == "q"
    report = export_genai(adapters, tmp_path / "pkg", mode="mixed")
    rows = [report.tokens[key] for key in sorted(report.tokens)]
    assert len(rows) == 2 and rows[0] != rows[1]


def test_a_mixture_of_experts_decoder_packages_merged_with_peft_tokens(tmp_path):
    """Mixtral, LoRA on q_proj and on both expert weights: the decode graph runs the experts
    as a gather and a batched matmul (torch.onnx has no translation for transformers' grouped
    matmul), and genai, which has no mixtral type, runs it as the mistral it is built on."""
    from tests.architectures import mixtral

    base, _ = mixtral()
    targets = ["q_proj", "mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
    spec = {"adapters": [{"method": "lora", "targets": targets, "rank": 4}]}
    adapted = peftc.compile(base, spec, token_inputs())
    perturb(adapted.trainable_parameters(), std=0.5, seed=1)
    assert any(a.site.experts for a in adapted.plan.assignments)
    adapted.eval().export_genai(str(tmp_path / "pkg"))

    config = json.loads((tmp_path / "pkg" / "genai_config.json").read_text())
    assert config["model"]["type"] == "mistral"
    got = genai_tokens(tmp_path / "pkg", [PROMPT], NEW)[0]
    assert got != hf_tokens(base, [PROMPT], NEW)[0]  # the adapters change the tokens
    assert got == peft_tokens(base, adapted, tmp_path)
    assert base.config._experts_implementation != "batched_mm"  # the model is given back


def test_a_sliding_window_decoder_packages_with_peft_tokens(tmp_path):
    """Mistral with a window of 4 tokens, decoding 16: past the window every step masks the
    older cache. (onnxscript's ORT fusions computed this decoder wrong, 0.3 off PyTorch on a
    decode step, so the fused graph is checked against PyTorch and dropped when it is off.)"""
    from tests.architectures import mistral

    base, _ = mistral()
    spec = {"adapters": [{"method": "lora", "targets": TARGETS, "rank": 4}]}
    adapted = peftc.compile(base, spec, token_inputs())
    perturb(adapted.trainable_parameters(), std=0.5, seed=1)
    report = adapted.eval().export_genai(str(tmp_path / "pkg"))
    got = genai_tokens(tmp_path / "pkg", [PROMPT], NEW)[0]
    assert got != hf_tokens(base, [PROMPT], NEW)[0]  # the adapters change the tokens
    assert got == peft_tokens(base, adapted, tmp_path), report.summary()


def test_a_decoder_genai_has_no_type_for_packages_as_its_generic_decoder(tmp_path):
    """GPT-2 (Conv1D projections, learned positions): genai's gpt2 type expects another cache
    layout ("Model input was not found"), and Falcon, GPT-J, BLOOM, ... have no type at all;
    the package says "decoder", genai's generic decoder-only type, and gives PEFT's tokens."""
    from tests.models import tiny_gpt2

    base = tiny_gpt2()
    spec = {"adapters": [{"method": "lora", "targets": ["c_attn", "c_proj"], "rank": 4}]}
    adapted = peftc.compile(base, spec, token_inputs())
    perturb(adapted.trainable_parameters(), std=0.5, seed=1)
    report = adapted.eval().export_genai(str(tmp_path / "pkg"))

    config = json.loads((tmp_path / "pkg" / "genai_config.json").read_text())
    assert config["model"]["type"] == "decoder"
    # onnxscript's MHA fusion drops the Reshape that flattens the attention for the Gemm;
    # peftc puts it back, so the fused decoder is kept
    assert report.fusions["flat_attention_output"] == 2 and report.fusions_dropped is None
    got = genai_tokens(tmp_path / "pkg", [PROMPT], NEW)[0]
    assert got != hf_tokens(base, [PROMPT], NEW)[0]  # the adapters change the tokens
    assert got == peft_tokens(base, adapted, tmp_path)


def test_the_reference_tokens_stop_before_the_end_token_as_genai_does():
    """transformers keeps the end token it generated (and pads finished rows after it);
    onnxruntime-genai's sequences stop before it, so the reference drops it."""
    from types import SimpleNamespace

    from lowering.genai import _until_eos

    model = SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=2))
    assert _until_eos([5, 6, 7, 2, 0, 0], model, start=2) == [5, 6, 7]
    assert _until_eos([5, 2, 7, 8], model, start=2) == [5, 2, 7, 8]  # a 2 in the prompt stays
