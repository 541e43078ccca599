"""Merge: the merged graph is the base graph (same op multiset), it computes the unmerged
model's outputs (fp32, 1e-5), and methods that cannot merge or merge to NaN say where."""

import pytest
import torch

import peftc
from passes.cleanup import Cleanup
from passes.merge import MergeError, fold_weights, merged_weights, op_multiset
from rewrite.sites import find_sites
from rewrite.trace import trace
from rewrite.unlift import unlift
from tests.method_cases import example_inputs
from tests.models import convnet, image_inputs, perturb, tiny_gpt2, tiny_llama, token_inputs

TOL = 1e-5  # fp32

CASES = {
    "llama": None,  # the shared lora model (tests/method_cases.py): q, v, down and embed_tokens
    # wte is tied to lm_head: merging it must give lm_head a weight of its own
    "gpt2": (tiny_gpt2, lambda: token_inputs(2, 16), ["c_attn", "c_fc", "wte"]),
    "convnet": (convnet, lambda: image_inputs(2), ["conv1", "conv2", "conv3", "head"]),
}


def _out(model, inputs):
    with torch.no_grad():
        out = model(**inputs) if isinstance(inputs, dict) else model(*inputs)
    return out if isinstance(out, torch.Tensor) else out[0]


def _base_ops(model, inputs):
    """The base model's own eval trace after the same dead-code cleanup the pipelines run."""
    program = trace(model, inputs, training=False)
    Cleanup()(program)
    return op_multiset(program.graph)


def _call(gm, model, inputs):
    from rewrite.trace import bind_inputs

    return _out(gm, bind_inputs(model, inputs))


@pytest.fixture(scope="module", params=list(CASES))
def merged_case(request, shared_models):
    if CASES[request.param] is None:
        shared = shared_models.get("lora")
        shared.restore()
        base, inputs, adapted = shared.base, example_inputs, shared.adapted
    else:
        make, inputs, targets = CASES[request.param]
        base = make()
        spec = {"adapters": [{"method": "lora", "targets": targets, "rank": 4, "alpha": 8}]}
        adapted = peftc.compile(base, spec, inputs())
        perturb(adapted.trainable_parameters())
        adapted.eval()
    return request.param, base, inputs, adapted, adapted.merge()


def test_merged_graph_has_the_base_op_multiset(merged_case):
    _, base, inputs, adapted, merged = merged_case
    base_ops = _base_ops(base, inputs())
    assert op_multiset(adapted.program(training=False).graph) != base_ops  # adapters present
    assert op_multiset(merged) == base_ops


# (tiny Llama: test_methods.py's test_merge, with every other method)
@pytest.mark.parametrize("merged_case", ["gpt2", "convnet"], indirect=True)
def test_merged_equals_unmerged(merged_case):
    name, base, inputs, adapted, merged = merged_case
    x = image_inputs(3, seed=5) if name == "convnet" else token_inputs(3, 20, seed=5)
    expected = _out(adapted, x)
    assert (expected - _out(base, x)).abs().max() > 1e-3  # the adapter does something
    torch.testing.assert_close(_call(merged, base, x), expected, atol=TOL, rtol=TOL)


@pytest.mark.parametrize("merged_case", ["gpt2"], indirect=True)  # tied weights: the hard case
def test_fold_into_a_fresh_base_trace_matches_merge(merged_case):
    """The fold used for fp16 export (re-traced base + merged weights) equals adapted.merge()."""
    name, base, inputs, adapted, merged = merged_case
    program = trace(base, inputs(), training=False)
    state = dict(base.named_parameters(remove_duplicate=False))
    state.update(base.named_buffers(remove_duplicate=False))
    folded = unlift(
        *fold_weights(
            program,
            find_sites(program),
            adapted.plan.assignments,
            state,
            merged_weights(adapted.plan.assignments, adapted.state()),
        )
    )
    assert op_multiset(folded) == op_multiset(merged)
    x = image_inputs(3, seed=6) if name == "convnet" else token_inputs(3, 9, seed=6)
    torch.testing.assert_close(_call(folded, base, x), _call(merged, base, x), atol=TOL, rtol=TOL)
    # the base model itself is untouched by merging
    assert all(not n.startswith("adapters") for n, _ in base.named_parameters())


# -- errors --------------------------------------------------------------------------------


def test_unmergeable_method_names_method_and_site(unmergeable_method):
    spec = {
        "adapters": [{"method": unmergeable_method, "targets": ["model.layers.0.self_attn.v_proj"]}]
    }
    adapted = peftc.compile(tiny_llama(layers=1), spec, token_inputs(2, 16)).eval()
    with pytest.raises(MergeError) as err:
        adapted.merge()
    message = str(err.value)
    assert unmergeable_method in message
    assert "model.layers.0.self_attn.v_proj" in message
    assert "gated by the input" in message and "unmerged" in message


def test_safe_merge_refuses_nan_weights(method_model):
    adapted = method_model("lora").adapted
    with torch.no_grad():
        params = adapted.named_adapter_parameters()
        params["adapters.model.layers.0.self_attn.q_proj.lora_B"].fill_(float("nan"))
    with pytest.raises(MergeError, match=r"lora at model\.layers\.0\.self_attn\.q_proj.*NaN"):
        adapted.merge()


def test_merge_in_fp32_then_cast_once(method_model):
    """fp16 merged weights are the fp32 merge rounded once, not a merge of rounded parts."""
    adapted = method_model("lora").adapted
    perturb(adapted.trainable_parameters(), std=0.3)
    state = adapted.state()
    fp32 = merged_weights(adapted.plan.assignments, state)
    fp16 = merged_weights(adapted.plan.assignments, state, dtype=torch.float16)
    assert fp16.keys() == fp32.keys() == {a.path for a in adapted.plan}
    for path, weight in fp16.items():
        assert weight.dtype == torch.float16
        assert torch.equal(weight, fp32[path].half())
