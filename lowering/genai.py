"""Decoder LLMs with a KV cache, packaged for onnxruntime-genai.

The traced graphs are one forward without a cache, so they cannot drive an incremental decode.
The decode graph is exported from the base model itself (a transformers causal LM), wrapped by
`CachedDecoder` to take and return its cache as flat tensors under onnxruntime-genai's names:

    input_ids [batch, sequence], attention_mask [batch, total_sequence],
    past_key_values.%d.key/value [batch, kv_heads, past_sequence, head_size]
      -> logits [batch, sequence, vocab], present.%d.key/value [batch, kv_heads, total, head]

The adapters reach that graph in one of three forms (`mode`):
- "merged": folded into the weights (`merged_weights`, fp32 then cast once, as export_merged);
- "inputs": LoRA adapters as graph inputs, one `.onnx_adapter` file per adapter, loaded at run
  time by `og.Adapters` (the Olive ExtractAdapters convention). Each input defaults to zeros,
  so with no adapter active the package runs the base model;
- "mixed": peftc's per-row mixing: the adapters stacked as constants and an `adapter_ids
  [batch]` input picks one per row, as the multi-adapter graph does (lowering/multi_adapter.py).
The unmerged forms are forward hooks on the adapted modules (as `generate` does), reading the
stacked LoRA tensors; `stacked_lora` explains why B is stored as -s·B.

The export goes through the shared pipeline (lowering/onnx.py): onnxscript's ORT fusions turn
the attention into GroupQueryAttention with rotary inside, as onnxruntime-genai's model builder
writes it by hand. Verification runs onnxruntime-genai's greedy search from token ids and
requires the tokens of transformers' `generate` on the same weights in PyTorch.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lowering.genai_graph import builder_edits
from lowering.multi_adapter import IDS, checked_pipelines, stacked_lora
from lowering.onnx import DTYPES, TOLERANCE, OnnxExportError, export_module
from passes.merge import merged_biases, merged_weights
from passes.pipeline import Pipeline, pipeline_of
from rewrite.files import staged, write_atomic

MODES = ("merged", "inputs", "mixed")
PAST = "past_key_values.{}.{}"
PRESENT = "present.{}.{}"
# files a model directory may hold that onnxruntime-genai's tokenizer reads
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
)
INSTALL = "pip install --no-deps onnxruntime-genai"


class GenaiError(RuntimeError):
    """The package could not be written, or onnxruntime-genai disagrees with transformers."""


@dataclass
class GenaiReport:
    """What `export_genai` wrote and how its tokens compared."""

    directory: str
    mode: str
    dtype: str
    files: list[str]
    fusions: dict[str, int] = field(default_factory=dict)
    tokens: dict[str, list[int]] = field(default_factory=dict)  # what genai generated, per case
    fusions_dropped: str | None = None  # why the ORT-fused decoder was not kept, if it was not

    def summary(self) -> str:
        fused = ", ".join(f"{k}={v}" for k, v in sorted(self.fusions.items()) if v)
        dropped = f" (dropped, exported unfused: {self.fusions_dropped})"
        lines = [
            f"wrote {self.directory} ({self.mode}, {self.dtype}): {', '.join(self.files)}",
            f"ort fusions: {fused or 'none'}{dropped if self.fusions_dropped else ''}",
        ]
        for case, tokens in self.tokens.items():
            lines.append(
                f"onnxruntime-genai greedy == transformers generate ({case}): {len(tokens)} tokens"
            )
        return "\n".join(lines)


# -- the model's shape ---------------------------------------------------------------------


@dataclass(frozen=True)
class DecoderShape:
    layers: int
    heads: int
    kv_heads: int
    head_size: int
    hidden: int
    vocab: int
    context: int


def decoder_shape(model: torch.nn.Module) -> DecoderShape:
    """The numbers genai_config.json and the cache tensors need, from a transformers config."""
    config = getattr(model, "config", None)
    need = ("num_hidden_layers", "num_attention_heads", "hidden_size", "vocab_size")
    if config is None or not callable(getattr(model, "generate", None)):
        raise GenaiError(
            f"{type(model).__name__} is not a transformers causal LM (a config and generate()); "
            "the onnxruntime-genai package is for decoder LLMs"
        )
    missing = [n for n in need if getattr(config, n, None) is None]
    if missing or getattr(config, "is_encoder_decoder", False):
        raise GenaiError(
            f"{type(model).__name__} is not a decoder-only LLM (config lacks "
            f"{', '.join(missing) or 'nothing, but it is an encoder-decoder'}); the "
            "onnxruntime-genai package is for decoder LLMs"
        )
    heads = config.num_attention_heads
    return DecoderShape(
        layers=config.num_hidden_layers,
        heads=heads,
        kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_size=getattr(config, "head_dim", None) or config.hidden_size // heads,
        hidden=config.hidden_size,
        vocab=config.vocab_size,
        context=getattr(config, "max_position_embeddings", None) or 2048,
    )


# -- the decode graph ----------------------------------------------------------------------


class CachedDecoder(torch.nn.Module):
    """`model` with its KV cache as flat tensors in and out (onnxruntime-genai's names).

    Other named inputs (adapter tensors, adapter ids) are kept in `self.extra` for the length
    of the call, where the adapter hooks read them."""

    def __init__(self, model: torch.nn.Module, shape: DecoderShape):
        super().__init__()
        self.model = model
        self.shape = shape
        self.extra: dict[str, torch.Tensor] = {}

    def forward(self, input_ids, attention_mask, **tensors: torch.Tensor) -> dict:
        from transformers import DynamicCache

        cache = DynamicCache()
        for i in range(self.shape.layers):
            cache.update(
                tensors.pop(PAST.format(i, "key")), tensors.pop(PAST.format(i, "value")), i
            )
        self.extra = tensors
        try:
            out = self.model(
                input_ids=input_ids, attention_mask=attention_mask, cache=cache, use_cache=True
            )
        finally:
            self.extra = {}
        outputs = {"logits": out.logits}
        for i, layer in enumerate(cache.layers):
            outputs[PRESENT.format(i, "key")] = layer.keys
            outputs[PRESENT.format(i, "value")] = layer.values
        return outputs


def _cache(shape: DecoderShape, batch: int, past: int, dtype: torch.dtype) -> dict:
    size = (batch, shape.kv_heads, past, shape.head_size)
    g = torch.Generator().manual_seed(0)
    return {
        PAST.format(i, kind): torch.randn(size, generator=g).to(dtype)
        for i in range(shape.layers)
        for kind in ("key", "value")
    }


def example_inputs(shape: DecoderShape, batch: int, seq: int, past: int, dtype) -> dict:
    """Decoder inputs: `seq` new tokens after `past` cached ones."""
    g = torch.Generator().manual_seed(0)
    return {
        "input_ids": torch.randint(0, shape.vocab, (batch, seq), generator=g),
        "attention_mask": torch.ones(batch, past + seq, dtype=torch.int64),
        **_cache(shape, batch, past, dtype),
    }


def _dynamic_shapes(inputs: Mapping[str, torch.Tensor]) -> tuple:
    from torch.export import Dim

    batch, seq = Dim("batch"), Dim("sequence")
    total, past = Dim("total_sequence"), Dim("past_sequence")
    per_name = {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: total}}
    shapes = []
    for name in inputs:
        if name in per_name:
            shapes.append(per_name[name])
        elif name.startswith("past_key_values."):
            shapes.append({0: batch, 2: past})
        elif name == IDS:
            shapes.append({0: batch})
        else:  # adapter tensors: fixed shapes (the stacked rank)
            shapes.append({})
    return tuple(shapes)


# -- the adapters' three forms -------------------------------------------------------------


def _module_weight(model: torch.nn.Module, path: str, weight: str) -> tuple[torch.nn.Module, str]:
    """The module and leaf name that hold the weight `weight` of the site at `path` in the
    model's own tables (the module at the path for a layer, so a tied head is merged alone)."""
    module = model.get_submodule(path) if path and path != weight else model
    if module is not model and "weight" in getattr(module, "_parameters", {}):
        return module, "weight"
    owner, _, leaf = weight.rpartition(".")
    return model.get_submodule(owner), leaf


@contextlib.contextmanager
def _merged_in(pipeline: Pipeline, dtype: torch.dtype) -> Iterator[None]:
    """Within the block, the base model's adapted weights (and biases a method changes) are
    the merged ones, and every other floating tensor is cast to `dtype`."""
    from lowering.onnx import _cast_tensors

    assignments = pipeline.plan.assignments
    dense = pipeline.dense_state()
    merged = merged_weights(assignments, dense, True, dtype)
    biases = merged_biases(assignments, dense, dtype)
    model = pipeline.model
    saved = []
    with pipeline.dense_base(), _cast_tensors(model, dtype):
        try:
            for owner in merged:  # whole sites: a packed projection's slices merge into one
                module, leaf = _module_weight(model, owner, pipeline.sites[owner].weight)
                saved.append((module, leaf, module._parameters[leaf]))
                module._parameters[leaf] = torch.nn.Parameter(merged[owner], requires_grad=False)
                if owner in biases and getattr(module, "bias", None) is not None:
                    saved.append((module, "bias", module._parameters["bias"]))
                    module._parameters["bias"] = torch.nn.Parameter(
                        biases[owner], requires_grad=False
                    )
            yield
        finally:
            for module, leaf, value in reversed(saved):
                module._parameters[leaf] = value


def adapter_input_names(path: str) -> tuple[str, str]:
    """The graph input (and .onnx_adapter parameter) names of a site's two LoRA tensors."""
    return f"{path}.lora_A.weight", f"{path}.lora_B.weight"


@contextlib.contextmanager
def _hooked(decoder: CachedDecoder, stacked: Mapping, mode: str) -> Iterator[None]:
    """Forward hooks adding each site's LoRA update, y - (x Aᵀ)(-sB)ᵀ: from the call's
    adapter inputs ("inputs") or from the stacked constants picked by adapter_ids ("mixed")."""
    model = decoder.model
    handles = []

    def hook_for(path: str):
        def add(module, args, y):
            x = args[0]
            if mode == "inputs":
                a_name, b_name = adapter_input_names(path)
                A, B = decoder.extra[a_name], decoder.extra[b_name]
                return y - (x @ A.t().to(x.dtype)) @ B.t().to(x.dtype)
            A, B = stacked[path]
            ids = decoder.extra[IDS]
            a_sel = A.to(x.dtype).index_select(0, ids)  # [batch, r, in]
            b_sel = B.to(x.dtype).index_select(0, ids)  # [batch, out, r]
            return y - torch.bmm(torch.bmm(x, a_sel.transpose(1, 2)), b_sel.transpose(1, 2))

        return add

    try:
        for path in stacked:
            handles.append(model.get_submodule(path).register_forward_hook(hook_for(path)))
        yield
    finally:
        for handle in handles:
            handle.remove()


def _adapter_tensors(stacked: Mapping, index: int, dtype: torch.dtype) -> dict:
    """Adapter `index`'s graph inputs: its rows of the stacked tensors (zeros where it skips a
    site), cast once to the package dtype."""
    out = {}
    for path, (A, B) in stacked.items():
        a_name, b_name = adapter_input_names(path)
        out[a_name] = A[index].to(dtype).contiguous()
        out[b_name] = B[index].to(dtype).contiguous()
    return out


def _zero_defaults(model, names: Sequence[str]) -> None:
    """Each named graph input of the onnx_ir `model` also gets an initializer of zeros, its
    value when no adapter is active (an ONNX input with an initializer is an overridable
    default)."""
    import numpy as np
    import onnx_ir as ir

    for value in model.graph.inputs:
        if value.name in names:
            dims = [int(d) for d in value.shape]
            value.const_value = ir.tensor(
                np.zeros(dims, dtype=value.type.dtype.numpy()), name=value.name
            )
            model.graph.register_initializer(value)


# -- the package ---------------------------------------------------------------------------


# onnxruntime-genai 0.18's own decoder-only types (its ModelType::IsLLM list, less gpt2 and
# lfm2: genai runs those with another model class, which expects GPT-2's combined cache or a
# convolution state, not this graph's inputs). Every other type is written as genai's generic
# "decoder", which picks the same decoder-only class: it runs the graph by its input and
# output names, so Falcon, GPT-J, BLOOM, OPT, GPT-NeoX, Starcoder2, Qwen2-MoE and GPT-2 package
# too. A type genai has is kept, as its model builder writes it.
GENAI_DECODER_TYPES = frozenset(
    "chatglm ernie4_5 gemma gemma2 gemma3_text granite internlm2 llama mistral nemotron olmo "
    "phi phi3 phi3small phimoe qwen2 qwen3 smollm3".split()
)
GENAI_TYPE = {"mixtral": "mistral"}  # a family genai has, by another name


def genai_type(model_type: str) -> str:
    """The `model.type` of genai_config.json for a transformers `model_type`."""
    model_type = GENAI_TYPE.get(model_type, model_type)
    return model_type if model_type in GENAI_DECODER_TYPES else "decoder"


def genai_config(model: torch.nn.Module, shape: DecoderShape, share_buffer: bool) -> dict:
    """onnxruntime-genai's genai_config.json for the package (the model builder's layout;
    onnxruntime-genai refuses keys it does not know, so nothing of peftc's goes in)."""
    config = model.config
    generation = getattr(model, "generation_config", None)

    def token(name: str, default: Any) -> Any:
        value = getattr(generation, name, None)
        if value is None:
            value = getattr(config, name, None)
        return default if value is None else value

    eos = token("eos_token_id", 0)
    return {
        "model": {
            "bos_token_id": token("bos_token_id", 0),
            "context_length": shape.context,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": "model.onnx",
                "head_size": shape.head_size,
                "hidden_size": shape.hidden,
                "inputs": {
                    "input_ids": "input_ids",
                    "attention_mask": "attention_mask",
                    "past_key_names": "past_key_values.%d.key",
                    "past_value_names": "past_key_values.%d.value",
                },
                "outputs": {
                    "logits": "logits",
                    "present_key_names": "present.%d.key",
                    "present_value_names": "present.%d.value",
                },
                "num_attention_heads": shape.heads,
                "num_hidden_layers": shape.layers,
                "num_key_value_heads": shape.kv_heads,
            },
            "eos_token_id": eos,
            "pad_token_id": token("pad_token_id", eos[0] if isinstance(eos, list) else eos),
            "type": genai_type(getattr(config, "model_type", "")),
            "vocab_size": shape.vocab,
        },
        "search": {
            "do_sample": False,
            "max_length": shape.context,
            "min_length": 0,
            "num_beams": 1,
            "num_return_sequences": 1,
            # one preallocated buffer for past and present where only GroupQueryAttention
            # reads the cache (lowering/genai_graph.py); else present = past + new, a new
            # tensor at each step
            "past_present_share_buffer": share_buffer,
            "repetition_penalty": 1.0,
            "temperature": 1.0,
            "top_k": 1,
            "top_p": 1.0,
        },
    }


def _write_adapter_file(path: Path, tensors: Mapping[str, torch.Tensor]) -> None:
    """One .onnx_adapter file (onnxruntime's LoRA adapter format), written atomically."""
    import onnxruntime as ort

    fmt = ort.AdapterFormat()
    fmt.set_adapter_version(1)
    fmt.set_model_version(1)
    fmt.set_parameters({n: ort.OrtValue.ortvalue_from_numpy(t.numpy()) for n, t in tensors.items()})
    with staged(path) as tmp:
        fmt.export_adapter(str(tmp))


def export_genai(
    adapters: Any,
    directory: str | Path,
    *,
    mode: str = "merged",
    dtype: str = "fp32",
    names: Sequence[str] | None = None,
    model_dir: str | Path | None = None,
    check: bool = True,
    prompt: Sequence[int] | None = None,
    max_new_tokens: int = 8,
) -> GenaiReport:
    """Write an onnxruntime-genai package for `adapters` (one AdaptedModel, or several on one
    base for `mode="inputs"`/`"mixed"`) into `directory`, and verify its greedy tokens.

    `names` name the adapters' .onnx_adapter files (default adapter0, adapter1, ...);
    `model_dir` is the base model's directory, whose tokenizer files are copied."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    many = list(adapters) if isinstance(adapters, (list, tuple)) else [adapters]
    if mode == "merged" and len(many) != 1:
        raise ValueError(
            f"a merged package holds one adapter, got {len(many)}; use mode='inputs' "
            "(og.Adapters files) or mode='mixed' (adapter_ids per row) for several"
        )
    if mode == "merged":
        pipelines = [pipeline_of(many[0])]
    else:
        pipelines = checked_pipelines(many)
        if any(p.quantized_weights for p in pipelines):
            raise GenaiError(
                "unmerged adapters over a quantized base are not packaged; export merged "
                "(the base is dequantized into the merge) or from the fp32 base"
            )
    names = list(names or [f"adapter{i}" for i in range(len(many))])
    if len(names) != len(many):
        raise ValueError(f"{len(names)} names for {len(many)} adapters")
    model = pipelines[0].model
    shape = decoder_shape(model)
    torch_dtype = DTYPES[dtype]
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)

    stacked = {} if mode == "merged" else stacked_lora(pipelines)
    decoder = CachedDecoder(model, shape).eval()
    example = example_inputs(shape, 2, 3, 5, torch_dtype)
    step = example_inputs(shape, 2, 1, 5, torch_dtype)  # the fused graph must run a decode step
    extra: dict[str, torch.Tensor] = {}
    if mode == "inputs":
        extra = _adapter_tensors(stacked, 0, torch_dtype)
    elif mode == "mixed":
        extra = {IDS: torch.tensor([0, len(many) - 1], dtype=torch.int64)}
    example.update(extra)
    step.update(extra)
    edits: dict[str, int] = {}

    def finish(graph) -> None:
        edits.update(builder_edits(graph, shape.context))
        if mode == "inputs":
            _zero_defaults(graph, list(extra))

    try:
        with (
            _eval_mode(model),
            _exportable_experts(model),
            _weights(pipelines[0], mode, torch_dtype),
            _hooked(decoder, stacked, mode),
        ):
            report = export_module(
                decoder,
                example,
                directory / "model.onnx",
                dynamic_shapes=_dynamic_shapes(example),
                fusion_check=[step],
                fusion_tolerance=TOLERANCE[dtype],
                finish=finish,
            )
    except OnnxExportError as e:
        raise GenaiError(
            f"the KV-cache decoder of {type(model).__name__} did not export: {e}"
        ) from e
    files = ["model.onnx"]
    if mode == "inputs":
        for i, name in enumerate(names):
            _write_adapter_file(
                directory / f"{name}.onnx_adapter", _adapter_tensors(stacked, i, torch_dtype)
            )
            files.append(f"{name}.onnx_adapter")
    config = genai_config(model, shape, share_buffer=bool(edits["shared_cache_buffer"]))
    write_atomic(directory / "genai_config.json", json.dumps(config, indent=2) + "\n")
    files.append("genai_config.json")
    files += _copy_tokenizer(model_dir, directory)
    result = GenaiReport(
        str(directory),
        mode,
        dtype,
        files,
        fusions={**report.fusions, **edits},
        fusions_dropped=report.fusions_dropped,
    )
    if check:
        result.tokens = verify_genai(
            directory, pipelines, mode, dtype, names, prompt, max_new_tokens
        )
    return result


@contextlib.contextmanager
def _weights(pipeline: Pipeline, mode: str, dtype: torch.dtype) -> Iterator[None]:
    """The base weights the decode graph is exported with: merged ("merged"), or the base's
    own, cast (any other mode)."""
    if mode == "merged":
        with _merged_in(pipeline, dtype):
            yield
        return
    from lowering.onnx import _cast_tensors

    with _cast_tensors(pipeline.model, dtype):
        yield


def _copy_tokenizer(model_dir: str | Path | None, directory: Path) -> list[str]:
    if model_dir is None or not Path(model_dir).is_dir():
        return []
    copied = []
    for name in TOKENIZER_FILES:
        source = Path(model_dir) / name
        if source.is_file():
            with staged(directory / name) as tmp:
                shutil.copyfile(source, tmp)
            copied.append(name)
    return copied


# -- verification --------------------------------------------------------------------------


def _genai():
    try:
        import onnxruntime_genai as og
    except ImportError as e:
        raise GenaiError(
            f"verifying the package needs onnxruntime-genai: {INSTALL} (--no-deps keeps the "
            "installed onnxruntime-gpu as its runtime); or pass check=False"
        ) from e
    return og


def genai_tokens(
    directory: str | Path,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    adapter: tuple[Any, str] | None = None,
    inputs: Mapping[str, Any] | None = None,
) -> list[list[int]]:
    """onnxruntime-genai's greedy tokens for `prompts` (equal lengths), prompt included.
    `adapter` is (og.Adapters, name) to activate; `inputs` are extra model inputs."""
    og = _genai()
    model = og.Model(str(directory))
    return _run(og, model, prompts, max_new_tokens, adapter, inputs)


def _run(og, model, prompts, max_new_tokens, adapter=None, inputs=None) -> list[list[int]]:
    import numpy as np

    params = og.GeneratorParams(model)
    length = len(prompts[0]) + max_new_tokens
    params.set_search_options(max_length=length, do_sample=False, batch_size=len(prompts))
    generator = og.Generator(model, params)
    if adapter is not None:
        generator.set_active_adapter(*adapter)
    for name, value in (inputs or {}).items():
        generator.set_model_input(name, np.ascontiguousarray(value))
    generator.append_tokens(np.asarray(prompts, dtype=np.int32))
    while not generator.is_done():
        generator.generate_next_token()
    return [[int(t) for t in generator.get_sequence(i)] for i in range(len(prompts))]


def hf_tokens(
    model: torch.nn.Module, prompts: Sequence[Sequence[int]], max_new_tokens: int
) -> list[list[int]]:
    """transformers' greedy `generate` for `prompts` (equal lengths), prompt included."""
    ids = torch.tensor(list(prompts), dtype=torch.int64)
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=model.generation_config.pad_token_id or 0,
        )
    return [_until_eos(row.tolist(), model, len(prompts[0])) for row in out]


def _until_eos(tokens: list[int], model: torch.nn.Module, start: int) -> list[int]:
    """A generated row up to its first end token, which is dropped: onnxruntime-genai's
    sequences stop before it (and HF pads the finished rows of a batch after it)."""
    eos = model.generation_config.eos_token_id
    ends = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
    for i in range(start, len(tokens)):
        if tokens[i] in ends:
            return tokens[:i]
    return tokens


def _reference(pipeline: Pipeline, mode: str, dtype: torch.dtype, prompts, n) -> list[list[int]]:
    """transformers' greedy tokens on the weights `mode` exports: merged, or the base's."""
    with _eval_mode(pipeline.model), _weights(pipeline, mode, dtype):
        return hf_tokens(pipeline.model, prompts, n)


@contextlib.contextmanager
def _exportable_experts(model: torch.nn.Module) -> Iterator[None]:
    """transformers 5 runs a mixture of experts through a grouped matmul (or a loop over the
    experts that were hit), neither of which torch.onnx exports; its `batched_mm`
    implementation, each token's experts gathered and one batched matmul, is the same product
    in ops it does. The decode graph is exported with that one, the model restored after."""
    configs = {
        id(m.config): m.config
        for m in model.modules()
        if getattr(getattr(m, "config", None), "_experts_implementation", None) is not None
    }
    was = {key: config._experts_implementation for key, config in configs.items()}
    try:
        for config in configs.values():
            config._experts_implementation = "batched_mm"
        yield
    finally:
        for key, config in configs.items():
            config._experts_implementation = was[key]


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def default_prompt(vocab: int, length: int = 8) -> list[int]:
    g = torch.Generator().manual_seed(11)
    return torch.randint(3, vocab, (length,), generator=g).tolist()


def verify_genai(
    directory: str | Path,
    pipelines: Sequence[Pipeline],
    mode: str,
    dtype: str,
    names: Sequence[str],
    prompt: Sequence[int] | None = None,
    max_new_tokens: int = 8,
) -> dict[str, list[int]]:
    """onnxruntime-genai's greedy tokens against transformers' on the merged PyTorch model:
    the adapter merged ("merged"), each adapter file active and none ("inputs"), one batch
    whose rows use different adapters ("mixed"). Raises GenaiError on the first mismatch."""
    og = _genai()
    shape = decoder_shape(pipelines[0].model)
    prompt = list(prompt or default_prompt(shape.vocab))
    torch_dtype = DTYPES[dtype]
    model = og.Model(str(directory))
    results: dict[str, list[int]] = {}

    def check(case: str, got: list[int], want: list[int]) -> None:
        if got != want:
            first = next((i for i, (g, w) in enumerate(zip(got, want)) if g != w), None)
            raise GenaiError(
                f"{directory}: onnxruntime-genai's greedy tokens differ from transformers' "
                f"generate on the merged model ({case}, first at position {first}):\n"
                f"  genai        {got}\n  transformers {want}"
            )
        results[case] = got
        print(f"verify {Path(directory).name} ({case}): genai == transformers, {len(got)} tokens")

    if mode == "merged":
        want = _reference(pipelines[0], "merged", torch_dtype, [prompt], max_new_tokens)[0]
        check("merged", _run(og, model, [prompt], max_new_tokens)[0], want)
    elif mode == "inputs":
        adapters = og.Adapters(model)
        for name in names:
            adapters.load(str(Path(directory) / f"{name}.onnx_adapter"), name)
        for pipeline, name in zip(pipelines, names):
            want = _reference(pipeline, "merged", torch_dtype, [prompt], max_new_tokens)[0]
            got = _run(og, model, [prompt], max_new_tokens, adapter=(adapters, name))[0]
            check(name, got, want)
        base = _reference(pipelines[0], "base", torch_dtype, [prompt], max_new_tokens)[0]
        check("no adapter", _run(og, model, [prompt], max_new_tokens)[0], base)
    else:
        rows = list(range(len(pipelines)))
        prompts = [prompt] * len(rows)
        got = _run(og, model, prompts, max_new_tokens, inputs={IDS: torch.tensor(rows).numpy()})
        for row, pipeline in zip(rows, pipelines):
            want = _reference(pipeline, "merged", torch_dtype, [prompt], max_new_tokens)[0]
            check(f"row {row}: {names[row]}", got[row], want)
    return results
