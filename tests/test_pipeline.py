"""The compile pipeline shares its work: each mode is traced once (the eval trace that placement
and calibration read becomes the eval graph), the spec and its placement section are parsed
once, and the fp16 export casts a copy of the weights instead of deep-copying the model. The
adapted model refuses to be copied or pickled whole, naming what to save instead."""

from __future__ import annotations

import copy
import io
import sys
from typing import Any

import pytest
import torch

import cost_model.placement_spec
import peftc
import rewrite.spec
import rewrite.trace
from lowering.onnx import merged_module
from passes.pipeline import ADAPT, MERGE, Pipeline, pipeline_of
from tests.models import perturb, tiny_llama, token_inputs

# a data-driven placement (PLoP NFN over the calibration batches) and a data-driven init (EVA)
SPEC = {
    "placement": {"strategy": "plop", "module_types": 2},
    "adapters": [{"method": "eva", "rank": 4, "alpha": 8}],
}


def _count_calls(monkeypatch, module, name: str) -> list[tuple[tuple, dict, Any]]:
    """Wrap `module.name` wherever a loaded module bound it (`from module import name`
    binds it again); returns the list each call appends (args, kwargs, result) to."""
    original = getattr(module, name)
    calls: list[tuple[tuple, dict, Any]] = []

    def counted(*args: Any, **kwargs: Any) -> Any:
        result = original(*args, **kwargs)
        calls.append((args, kwargs, result))
        return result

    for loaded in list(sys.modules.values()):
        # the module's namespace, not getattr: lazy modules (transformers) import on access
        namespace = getattr(loaded, "__dict__", None)
        if isinstance(namespace, dict) and namespace.get(name) is original:
            monkeypatch.setattr(loaded, name, counted)
    return calls


def _mode(call: tuple[tuple, dict, Any]) -> bool:
    args, kwargs, _ = call
    return kwargs["training"] if "training" in kwargs else args[2]


def test_each_mode_is_traced_once_and_the_spec_parsed_once(monkeypatch):
    traces = _count_calls(monkeypatch, rewrite.trace, "trace")
    specs = _count_calls(monkeypatch, rewrite.spec, "load_spec")
    placements = _count_calls(monkeypatch, cost_model.placement_spec, "parse_placement")
    model = tiny_llama(layers=1).train()
    batches = [token_inputs(2, 16, seed=10 + i) for i in range(2)]

    adapted = peftc.compile(model, SPEC, token_inputs(), calibration=batches)
    assert adapted.training and adapted.plan.site_scores  # placed from NFN scores
    assert any(a.method.name == "eva" for a in adapted.plan)  # initialised from the data
    # training graph, plus one eval trace shared by the NFN scores and EVA's capture
    assert sorted(_mode(c) for c in traces) == [False, True]
    assert len(specs) == 1 and len(placements) == 1
    assert adapted.spec.placement == placements[0][2]  # the spec carries the typed section

    adapted.eval()
    with torch.no_grad():
        adapted(**token_inputs(seed=3))
    adapted.merge()
    # the eval graph is the eval trace placement read, rewritten; not a second trace
    assert sorted(_mode(c) for c in traces) == [False, True]
    (eval_trace,) = [c[2] for c in traces if not _mode(c)]
    assert adapted.program(training=False) is eval_trace
    assert any(n.meta.get("peftc") for n in eval_trace.graph.nodes)  # adapters are in it
    assert len(specs) == 1 and len(placements) == 1


def test_adapted_model_is_a_thin_module_over_its_pipeline():
    adapted = peftc.compile(
        tiny_llama(layers=1),
        {"adapters": [{"method": "lora", "targets": ["q_proj"]}]},
        token_inputs(),
    )
    pipeline = pipeline_of(adapted)
    assert isinstance(pipeline, Pipeline) and pipeline_of(pipeline) is pipeline
    assert adapted.plan is pipeline.plan and adapted.spec is pipeline.spec
    assert adapted.base is pipeline.model and adapted.adapters is pipeline.adapters
    assert adapted.state().keys() == pipeline.state().keys()
    # the named pipelines, as run
    assert [r.name for r in adapted.pass_records] == list(ADAPT)
    assert [p.name for p in pipeline.merge_passes(pipeline.state())[0]] == list(MERGE)
    names = {n for n, _ in adapted.named_parameters()}
    assert {n for n in names if n.startswith("adapters.")} == {
        n for n in pipeline.adapter_parameters()
    }


def test_copying_or_pickling_the_whole_model_names_what_to_save_instead():
    adapted = peftc.compile(
        tiny_llama(layers=1),
        {"adapters": [{"method": "lora", "targets": ["q_proj"]}]},
        token_inputs(),
    )
    for copy_it in (copy.deepcopy, lambda m: torch.save(m, io.BytesIO())):
        with pytest.raises(TypeError, match=r"save_adapter\(directory\).*state_dict"):
            copy_it(adapted)
    buffer = io.BytesIO()
    torch.save(adapted.state_dict(), buffer)  # what the message offers works
    buffer.seek(0)
    assert torch.load(buffer).keys() == adapted.state_dict().keys()


def test_fp16_merge_leaves_the_base_model_as_it_was():
    model = tiny_llama(layers=1)
    adapted = peftc.compile(
        model, {"adapters": [{"method": "lora", "targets": ["q_proj", "v_proj"]}]}, token_inputs()
    ).eval()
    perturb(adapted.trainable_parameters())
    before = {n: (p, p.detach().clone()) for n, p in model.named_parameters()}
    gm = merged_module(adapted, "fp16")
    # the same fp32 tensors, untouched: the fp16 copies were swapped in for the trace only
    for n, p in model.named_parameters():
        assert p is before[n][0] and p.dtype == torch.float32
        assert torch.equal(p, before[n][1])
    assert all(p.dtype == torch.float16 for p in gm.parameters())
    x = token_inputs(3, 9, seed=6)
    with torch.no_grad():
        got = gm(**x).logits.float()
        expected = adapted.merge()(**x).logits
    torch.testing.assert_close(got, expected, atol=2e-2, rtol=2e-2)
