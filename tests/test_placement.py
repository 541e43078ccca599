"""Automatic placement: PLoP's module_types rule, the budget solver (exact, within budget,
spending it), EVA rank redistribution against PEFT, the placement section's errors, the
compile wiring and the `peftc plan` command."""

from __future__ import annotations

import itertools
import json
import random
import sys

import pytest
import torch

import peftc
from cost_model.costs import base_flops_per_token
from cost_model.eva_ranks import InputStats, redistribute
from cost_model.heatmap import write_heatmap
from cost_model.place import place
from cost_model.placement_spec import parse_placement
from cost_model.solver import Option, solve
from passes.adapters.registry import methods
from peftc.cli import main
from rewrite.spec import SpecError, load_spec
from tests.models import token_inputs


@pytest.fixture(scope="module")
def llama(traced):
    t = traced("llama")
    model, program, state = t.model, t.program, t.state
    batches = [token_inputs(batch=4, seq=20, seed=s) for s in range(2)]
    batches[0]["attention_mask"][0, 16:] = 0
    return model, program, t.sites, state, batches


def _place(llama, spec: dict):
    _, program, sites, state, batches = llama
    return place(load_spec(spec, methods()), sites, methods(), program, state, batches)


LORA = [{"method": "lora", "rank": 4}]  # no targets: the placement chooses


def test_module_types_keeps_the_three_lowest_types(llama):
    plan = _place(llama, {"placement": {"strategy": "plop", "module_types": 3}, "adapters": LORA})
    sites = llama[2]
    candidate_types = {s.module_type for s in sites if s.op == "linear" and s.path != "lm_head"}
    lowest = sorted(candidate_types, key=plan.type_scores.__getitem__)[:3]
    assert {a.site.module_type for a in plan.sites} == set(lowest)
    expected = [s.path for s in sites if s.module_type in lowest]
    assert [a.path for a in plan.sites] == expected
    assert all(a.rank == 4 for a in plan.sites)
    # lm_head is scored but not a candidate; embeddings are not scored
    assert "lm_head" in plan.site_scores and "lm_head" not in [a.path for a in plan.sites]
    assert "not a candidate" in plan.reasons["lm_head"]
    assert "model.embed_tokens" not in plan.site_scores
    for t in candidate_types:
        assert plan.type_reasons[t].startswith("chosen" if t in lowest else "not chosen")
    assert plan.type_scores == {
        t: pytest.approx(
            sum(v for p, v in plan.site_scores.items() if sites[p].module_type == t)
            / sum(1 for p in plan.site_scores if sites[p].module_type == t)
        )
        for t in plan.type_scores
    }


def test_explicit_targets_narrow_the_candidates(llama):
    rule = [{"method": "lora", "rank": 4, "targets": ["*.o_proj", "*.down_proj", "*.up_proj"]}]
    plan = _place(llama, {"placement": {"strategy": "plop", "module_types": 2}, "adapters": rule})
    pair = sorted(
        ["self_attn.o_proj", "mlp.down_proj", "mlp.up_proj"], key=plan.type_scores.__getitem__
    )[:2]
    assert {a.site.module_type for a in plan.sites} == set(pair)


def test_lm_head_is_a_candidate_only_when_named(llama):
    named = [{"method": "lora", "rank": 4, "targets": ["lm_head", "*.q_proj"]}]
    plan = _place(llama, {"placement": {"strategy": "all"}, "adapters": named})
    assert "lm_head" in [a.path for a in plan.sites]
    plan = _place(llama, {"placement": {"strategy": "all"}, "adapters": LORA})
    paths = [a.path for a in plan.sites]
    assert "lm_head" not in paths and len(paths) == 14  # 7 linear types x 2 layers


@pytest.mark.parametrize("budget", [{"params": "2%"}, {"params": 3000}, {"flops": "1%"}])
def test_budget_is_never_exceeded_and_is_spent(llama, budget):
    model, _, sites, _, _ = llama
    plan = _place(llama, {"placement": {"strategy": "plop", "budget": budget}, "adapters": LORA})
    ((kind, amount),) = budget.items()
    if kind == "params":
        total = sum(p.numel() for p in model.parameters())
        limit = int(total * 0.02) if amount == "2%" else amount
        spent = plan.trainable_parameters()
    else:
        limit = int(base_flops_per_token(sites) * 0.01)
        spent = plan.extra_flops(tokens=1)["forward"]
    assert plan.budget_limit == limit
    assert 0.95 * limit <= spent <= limit, (spent, limit)
    assert "lm_head" not in [a.path for a in plan.sites]
    assert plan.reasons and all(a.path in plan.reasons for a in plan.sites)


def test_budget_with_module_types_stays_in_the_chosen_types(llama):
    spec = {
        "placement": {"strategy": "plop", "module_types": 2, "budget": {"params": 2000}},
        "adapters": LORA,
    }
    plan = _place(llama, spec)
    types = {s.module_type for s in llama[2] if s.op == "linear" and s.path != "lm_head"}
    kept = sorted(types, key=plan.type_scores.__getitem__)[:2]
    assert {a.site.module_type for a in plan.sites} <= set(kept)
    assert 1900 <= plan.trainable_parameters() <= 2000


def test_solver_is_exact_against_brute_force():
    rng = random.Random(0)
    for _ in range(40):
        groups = [
            [
                Option(rng.randint(1, 12) * 3, rng.random() * 5, (g, k))
                for k in range(rng.randint(1, 3))
            ]
            for g in range(rng.randint(1, 5))
        ]
        capacity = rng.randint(0, 60)
        best = 0.0
        for pick in itertools.product(*[[None, *opts] for opts in groups]):
            chosen = [o for o in pick if o is not None]
            if sum(o.cost for o in chosen) <= capacity:
                best = max(best, sum(o.value for o in chosen))
        solution = solve(groups, capacity)
        assert solution.cost <= capacity
        assert solution.value == pytest.approx(best, abs=1e-9)


def test_eva_ranks_equal_peft(llama):
    from peft import EvaConfig, LoraConfig
    from peft.tuners.lora.eva import get_eva_state_dict

    model, program, sites, state, _ = llama
    batches = [token_inputs(batch=8, seq=32, seed=10 + s) for s in range(3)]
    targets = ["o_proj", "down_proj"]
    # PEFT cycles the data until its incremental PCA is stable at tau; 0.9 keeps that short
    eva = EvaConfig(rho=2.0, tau=0.9)
    config = LoraConfig(r=4, target_modules=targets, init_lora_weights="eva", eva_config=eva)
    reference = get_eva_state_dict(model, batches, config, show_progress_bar=False)
    expected = {path: u.shape[0] for path, u in reference.items()}
    rule = [{"method": "lora", "rank": 4, "alpha": 8, "targets": [f"*.{t}" for t in targets]}]
    spec = load_spec({"placement": {"strategy": "eva", "tau": 0.9}, "adapters": rule}, methods())
    plan = place(spec, sites, methods(), program, state, batches)
    got = {path: 0 for path in expected}
    got.update({a.path: a.rank for a in plan.sites})
    assert got == expected
    assert sum(got.values()) == 4 * len(expected)  # the rank budget is redistributed, not grown
    assert len(set(got.values())) > 1  # and really redistributed
    for a in plan.sites:  # alpha follows the rank, so alpha/r is unchanged
        assert a.method.alpha / a.method.rank == pytest.approx(2.0)


def test_eva_ratios_are_exact_and_shared_inputs_favour_the_first_site():
    g = torch.Generator().manual_seed(0)
    mixing = torch.randn(8, 8, generator=g)
    x = torch.randn(200, 8, generator=g) @ torch.diag(torch.linspace(3, 0.1, 8)) @ mixing
    y = torch.randn(200, 8, generator=g)  # isotropic: flat spectrum
    stats = {"a": InputStats(), "b": InputStats(), "c": InputStats()}
    for rows in (x[:100], x[100:]):
        stats["a"].add(rows)
        stats["b"].add(rows)  # b reads the same input as a
    stats["c"].add(y)
    result = redistribute(stats, {"a": 2, "b": 2, "c": 2}, [["a", "b"]], rho=2.0)
    eig = torch.linalg.eigvalsh(torch.cov(x.double().T, correction=0)).flip(0)
    assert result.ratios["a"] == pytest.approx((eig[:4] / eig.sum()).tolist(), rel=1e-9)
    assert result.ratios["a"] == result.ratios["b"]
    assert sum(result.ranks.values()) == 6
    assert result.ranks["a"] >= result.ranks["b"] >= result.ranks["a"] - 1
    assert result.ranks["a"] + result.ranks["b"] > 4  # the structured input wins the budget


@pytest.mark.parametrize(
    "placement, message",
    [
        ({"strategy": "plop", "modul_types": 3}, "did you mean 'module_types'"),
        ({"strategy": "plopp"}, "did you mean 'plop'"),
        ({"strategy": "plop", "budget": {"param": "1%"}}, "did you mean 'params'"),
        ({"strategy": "plop", "budget": {"params": "lots"}}, "is not a number"),
        ({"strategy": "plop", "budget": {"params": 0.005}}, "write a percentage like '0.5%'"),
        ({"strategy": "eva", "budget": {"params": "1%"}}, "eva takes no budget"),
        ({"strategy": "eva", "rho": 0.5}, "rho must be a number >= 1"),
        ({"strategy": "plop", "ranks": [4]}, "add a budget"),
    ],
)
def test_placement_errors_name_the_fix(placement, message):
    with pytest.raises(SpecError, match=message.replace("(", r"\(")):
        parse_placement(placement)


def test_budget_amounts_parse():
    assert (
        parse_placement({"strategy": "plop", "budget": {"params": "0.5%"}}).budget.limit(1000) == 5
    )
    assert (
        parse_placement({"strategy": "plop", "budget": {"params": 2_000_000}}).budget.limit(1)
        == 2_000_000
    )
    assert (
        parse_placement({"strategy": "plop", "budget": {"flops": "2M"}}).budget.limit(1)
        == 2_000_000
    )
    assert parse_placement({"strategy": "plop"}).module_types == 3  # PLoP's default


def test_data_driven_placement_needs_calibration(llama):
    _, program, sites, state, _ = llama
    spec = load_spec({"placement": {"strategy": "plop"}, "adapters": LORA}, methods())
    with pytest.raises(SpecError, match="calibration=batches"):
        place(spec, sites, methods(), program, state, None)


def test_compile_wires_calibration_into_placement(llama):
    model, *_, batches = llama
    spec = {"placement": {"strategy": "plop", "module_types": 3}, "adapters": LORA}
    adapted = peftc.compile(model, spec, token_inputs(), calibration=iter(batches))
    chosen = {a.path for a in adapted.plan.sites}
    assert len(chosen) == 6 and adapted.plan.type_scores and adapted.plan.site_scores
    built = {n.rsplit(".", 1)[0] for n in adapted.named_adapter_parameters()}
    assert built == {f"adapters.{p}" for p in chosen}
    totals = adapted.plan.totals(tokens=8)
    assert totals["trainable_params"] == sum(p.numel() for p in adapted.trainable_parameters())
    assert totals["flops_forward"] > 0 and totals["flops_backward"] > 0
    data = json.loads(adapted.plan.to_json())
    assert {s["path"] for s in data["sites"]} == chosen
    assert "r*(d_in + d_out)" in adapted.plan.table()


def test_plan_command_prints_and_writes_json_and_heatmap(llama, tmp_path, capsys, monkeypatch):
    *_, batches = llama
    calib = tmp_path / "calib.pt"
    torch.save(batches, calib)
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        "placement: {strategy: plop, module_types: 3}\nadapters:\n  - method: lora\n    rank: 4\n"
    )
    out, png = tmp_path / "plan.json", tmp_path / "nfn.png"
    argv = [
        "plan",
        "--model",
        "tests.models:tiny_llama",
        "--spec",
        str(spec),
        "--calib",
        str(calib),
    ]
    assert main([*argv, "--json", str(out), "--heatmap", str(png)]) == 0
    printed = capsys.readouterr().out
    assert "mean NFN" in printed and "placement: plop" in printed
    data = json.loads(out.read_text())
    assert len(data["sites"]) == 6 and len(data["type_scores"]) == 8
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if the extra were not installed
    with pytest.raises(RuntimeError, match="pip install matplotlib"):
        write_heatmap(_place(llama, {"placement": {"strategy": "all"}, "adapters": LORA}), png)
