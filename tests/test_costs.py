"""Sympy costs: every method's parameter formula counts the tensors it really builds, and the
formulas print and evaluate; the base-model sizes that budgets are percentages of."""

from __future__ import annotations

import pytest
import sympy

from cost_model.costs import (
    base_flops_per_token,
    base_parameters,
    budget_cost,
    cost_row,
    formula,
    method_cost,
)
from passes.adapters.base import bind_plan
from passes.adapters.cost import D_IN, D_OUT, R, T
from passes.adapters.insert import AdapterStore, create_adapter_tensors
from passes.adapters.registry import methods
from rewrite.capture import capture_site_inputs
from rewrite.spec import Assignment
from tests.method_cases import case, names
from tests.models import token_inputs

PATHS = {
    "llama": [
        "model.layers.0.self_attn.q_proj",  # 64 -> 64
        "model.layers.0.self_attn.k_proj",  # 64 -> 32
        "model.layers.0.mlp.down_proj",  # 96 -> 64
    ],
    "gpt2": ["transformer.h.0.attn.c_attn", "transformer.h.0.mlp.c_proj"],  # addmm sites
}


@pytest.fixture(scope="module")
def traced_sites(traced):
    out = {}
    for name in ("llama", "gpt2"):
        t = traced(name)
        model, program, sites, state = t.model, t.program, t.sites, t.state
        calib: dict[str, list] = {p: [] for p in PATHS[name]}
        batches = [token_inputs(batch=4, seq=16, seed=s) for s in range(2)]
        capture_site_inputs(
            program,
            state,
            sites,
            PATHS[name],
            batches,
            lambda p, rows, into=calib: into[p].append(rows),
        )
        out[name] = (model, program, sites, state, calib)
    return out


@pytest.mark.parametrize("name", names())
def test_param_formula_counts_the_built_adapter(traced_sites, name):
    method = case(name).instance()  # sizes that fit the tiny test layers
    checked = 0
    for model_name, (_, _, sites, state, calib) in traced_sites.items():
        chosen = [sites[p] for p in PATHS[model_name] if method.check(sites[p]) is None]
        if not chosen:
            continue
        plan = bind_plan([Assignment(site, method, 0) for site in chosen])
        store = AdapterStore()
        create_adapter_tensors(plan, state, store, seed=0, calibration=calib)
        built = {n: p for n, p in store.named_parameters() if p.requires_grad}
        shared = {n: p for n, p in built.items() if n.startswith("shared.")}
        formula_total = sum(method_cost(a.method, a.site).evaluate()["params"] for a in plan)
        assert formula_total == sum(p.numel() for p in built.values()), model_name
        if not shared:  # then each site's formula is exactly its own tensors
            for a in plan:
                own = sum(p.numel() for n, p in built.items() if n.startswith(a.site.path + "."))
                assert own > 0
                assert method_cost(a.method, a.site).evaluate()["params"] == own, a.site.path
        checked += len(plan)
    assert checked > 0, f"{name} accepted none of the test sites"


def test_lora_formulas_print_and_evaluate(traced_sites):
    _, _, sites, _, _ = traced_sites["llama"]
    site = sites["model.layers.0.mlp.down_proj"]
    lora = methods()["lora"](rank=8)
    cost = method_cost(lora, site)
    assert formula(cost, "params") == "r*(d_in + d_out)"
    assert sympy.simplify(cost.params - R * (D_IN + D_OUT)) == 0
    row = cost_row(lora, site, tokens=10)
    assert row.values["params"] == 8 * (96 + 64)
    # 2T·r·(d_in + d_out) for the two matmuls plus 2T·d_out for scale-and-add
    assert row.values["flops_forward"] == 2 * 10 * 8 * (96 + 64) + 2 * 10 * 64
    assert row.values["flops_backward"] == 2 * row.values["flops_forward"]
    assert "T" in row.formulas["flops_forward"] and T in cost.flops_forward.free_symbols
    assert budget_cost(lora, site, "params") == row.values["params"]
    assert (
        budget_cost(lora, site, "flops") == cost_row(lora, site, tokens=1).values["flops_forward"]
    )


def test_base_sizes(traced_sites):
    model, program, sites, state, _ = traced_sites["gpt2"]
    # GPT-2 ties lm_head to the token embedding: the shared storage counts once
    assert base_parameters(program, state) == sum(p.numel() for p in model.parameters())
    _, _, llama_sites, _, _ = traced_sites["llama"]
    expected = sum(2 * s.in_features * s.out_features for s in llama_sites if s.op != "embedding")
    assert base_flops_per_token(llama_sites) == expected > 0
