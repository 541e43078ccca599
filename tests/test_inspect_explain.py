"""Explain a site: original node, inserted subgraph, merged form, formula and reason."""

import pytest
import torch

import passes.adapters.lora as lora_module
import peftc
from peftc.inspect.explain import explain, format_explanation
from tests.models import perturb, tiny_llama, token_inputs

SPEC = {
    "adapters": [
        {"method": "lora", "targets": ["q_proj", "v_proj"], "rank": 4, "alpha": 8},
        {"method": "lora", "types": ["mlp.down_proj"], "layers": "1", "rank": 2},
    ]
}
Q0 = "model.layers.0.self_attn.q_proj"


@pytest.fixture(scope="module")
def adapted():
    out = peftc.compile(tiny_llama(), SPEC, token_inputs())
    perturb(out.trainable_parameters())  # non-zero B: the merged weight must differ from W
    return out


@pytest.fixture(scope="module")
def q0(adapted):
    (e,) = explain(adapted, "*.layers.0.self_attn.q_proj")
    return e


def test_original_and_inserted_nodes(adapted, q0):
    graph = adapted.program().graph
    spliced = [n for n in graph.nodes if Q0 in n.meta.get("peftc", {}).get("sites", ())]
    assert [line.split(" = ")[0] for line in q0.inserted] == [n.name for n in spliced]
    for node, line in zip(spliced, q0.inserted):  # fused nodes (shared with v_proj) say so
        assert line.split("\n")[0].endswith("[fused]") == (node.meta["peftc"]["role"] == "fused")
    out = next(n for n in spliced if n.meta["peftc"].get("output"))
    base = out.meta["peftc"]["base"]
    (original,) = q0.original
    assert original.startswith(f"{base} = aten.linear.default(")
    assert "p_model_layers_0_self_attn_q_proj_weight" in original
    assert any(f"replaces {base} for" in line for line in q0.inserted)
    assert q0.tensors == [
        f"adapters.{Q0}.lora_A  [4, 64]  (trainable)",
        f"adapters.{Q0}.lora_B  [64, 4]  (trainable)",
    ]


def test_merged_form_folds_the_adapter(adapted, q0):
    assert q0.merged[0].startswith("linear = aten.linear.default(")
    assert f"{Q0}.weight" in q0.merged[0]
    assert "adapter nodes left for this site after merging: 0" in q0.merged
    p = adapted.named_adapter_parameters()
    with torch.no_grad():
        delta = (2.0 * p[f"adapters.{Q0}.lora_B"] @ p[f"adapters.{Q0}.lora_A"]).abs().max()
    assert delta > 1e-3
    assert q0.merged_delta == pytest.approx(delta.item(), rel=1e-5)


def test_formula_cost_and_reason(adapted, q0):
    assert q0.method.startswith("LoRA(rank=4, alpha=8")
    assert q0.formula == lora_module.__doc__.strip()
    assert q0.why == [
        "placement: manual; matched adapters[0]",
        "the first rule that selects it: rule 0 (lora: targets ['q_proj', 'v_proj'])",
    ]
    assert q0.cost[0] == "params = r*(d_in + d_out) = 512"
    text = format_explanation(q0)
    for heading in (
        f"site {Q0}",
        "formula (from the method's docstring):",
        "why this site:",
        "original node (eval graph):",
        f"inserted subgraph (eval graph, {len(q0.inserted)} nodes):",
        "merged form (eval graph, adapters folded):",
    ):
        assert heading in text
    assert "LoRA: y = base(x) + s · B(A(dropout(x)))" in text
    (down,) = explain(adapted, "*.layers.1.mlp.down_proj")
    assert (
        down.why[1]
        == "the first rule that selects it: rule 1 (lora: types ['mlp.down_proj'], layers [1])"
    )


def test_unadapted_site_says_why_no_rule_took_it(adapted):
    by_path = {e.path: e for e in explain(adapted, "*.layers.0.*")}
    assert len(by_path) == 7 and by_path[Q0].adapted
    k0 = by_path["model.layers.0.self_attn.k_proj"]
    assert not k0.adapted and not k0.merged and not k0.inserted
    assert k0.why[1:] == [
        "rule 0 (lora: targets ['q_proj', 'v_proj']): no target matches this path",
        "rule 1 (lora: types ['mlp.down_proj'], layers [1]): "
        "type 'self_attn.k_proj' is not among its types",
    ]
    down0 = by_path["model.layers.0.mlp.down_proj"]
    assert down0.why[-1].endswith("layer 0 is not among its layers")
    assert "why not adapted:" in format_explanation(k0)


def test_no_matching_site_is_a_clear_error(adapted):
    with pytest.raises(ValueError, match=r"no site matches '\*\.qproj'.*'q_proj'"):
        explain(adapted, "*.qproj")
