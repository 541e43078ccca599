"""Placement chooses among the repeated blocks' sites: a module outside them (BERT's pooler) is a
candidate only when a rule names it, and the plan's table says why it was left out."""

from __future__ import annotations

import pytest

from cost_model.place import place
from passes.adapters.registry import methods
from rewrite.sites import find_sites
from rewrite.spec import SpecError, load_spec
from rewrite.trace import trace
from tests.models import convnet, image_inputs, tiny_bert, token_inputs

POOLER = "pooler.dense"
WHY = "not in a repeated block (no layer index)"


@pytest.fixture(scope="module")
def bert():
    model = tiny_bert()
    program = trace(model, token_inputs(), training=False)
    state = dict(model.named_parameters())
    state.update(model.named_buffers())
    batches = [token_inputs(batch=4, seq=20, seed=s) for s in range(2)]
    return program, find_sites(program), state, batches


def _place(bert, placement: dict, rule: dict | None = None):
    program, sites, state, batches = bert
    spec = {"placement": placement, "adapters": [{"method": "lora", "rank": 4, **(rule or {})}]}
    return place(load_spec(spec, methods()), sites, methods(), program, state, batches)


def _left_out_line(table: str, label: str) -> str:
    section = table.split("\nleft out", 1)
    assert len(section) == 2, f"the table has no 'left out' section:\n{table}"
    lines = [ln for ln in section[1].splitlines() if ln.split(" ", 1)[0] == label]
    assert len(lines) == 1, f"no single left-out line for {label}:\n{table}"
    return lines[0]


def test_plop_leaves_out_the_pooler_and_the_table_says_why(bert):
    plan = _place(bert, {"strategy": "plop", "module_types": 3})
    sites = bert[1]
    # the pooler is scored, and its NFN is among the 3 lowest: scoring alone would pick it
    assert sorted(plan.type_scores, key=plan.type_scores.__getitem__).index(POOLER) < 3
    block_types = {s.module_type for s in sites if s.layer is not None and s.op == "linear"}
    lowest = sorted(block_types, key=plan.type_scores.__getitem__)[:3]
    assert {a.site.module_type for a in plan.sites} == set(lowest)
    assert POOLER not in [a.path for a in plan.sites]
    assert plan.reasons[POOLER].startswith(f"not a candidate: {WHY}")
    assert "targets: [pooler.dense]" in plan.reasons[POOLER]  # the fix, spelled out
    assert plan.type_reasons[POOLER].startswith(f"not a candidate: {WHY}")
    table = plan.table()
    assert WHY in _left_out_line(table, POOLER)
    # the other left-out sites keep their reasons: embeddings, and the types not kept
    assert "embeddings are not placement candidates" in _left_out_line(
        table, "embeddings.word_embeddings"
    )
    dropped = sorted(block_types - set(lowest))[0]
    assert "mean NFN is not among the lowest" in _left_out_line(table, dropped)
    assert _left_out_line(table, dropped).split()[1] == "2"  # one line for its 2 layers


def test_strategy_all_takes_every_block_site_and_not_the_pooler(bert):
    plan = _place(bert, {"strategy": "all"})
    paths = [a.path for a in plan.sites]
    assert len(paths) == 12 and POOLER not in paths  # 6 linear types x 2 layers
    assert WHY in plan.reasons[POOLER]


def test_naming_the_pooler_makes_it_a_candidate(bert):
    rule = {"targets": ["*.query", "*.value", POOLER]}
    plan = _place(bert, {"strategy": "plop", "module_types": 3}, rule)
    assert POOLER in [a.path for a in plan.sites]
    assert plan.type_reasons[POOLER].startswith("chosen")
    # sites no rule selects say so, in the table too
    assert plan.reasons["encoder.layer.0.attention.self.key"].startswith("not selected")
    assert "not selected" in _left_out_line(plan.table(), "attention.self.key")
    # a literal suffix names it as PEFT's target_modules would: `dense` is every *.dense
    plan = _place(bert, {"strategy": "all"}, {"targets": ["dense"]})
    assert POOLER in [a.path for a in plan.sites]
    plan = _place(bert, {"strategy": "all"}, {"types": [POOLER]})
    assert [a.path for a in plan.sites] == [POOLER]


def test_a_wildcard_does_not_name_the_pooler(bert):
    plan = _place(bert, {"strategy": "all"}, {"targets": ["*.dense"]})
    paths = [a.path for a in plan.sites]
    assert len(paths) == 6 and all(p.startswith("encoder.layer.") for p in paths), paths
    assert WHY in plan.reasons[POOLER]
    # a glob that selects only the pooler is refused, and the message gives the literal fix
    with pytest.raises(
        SpecError, match=r"pooler\.dense: not in a repeated block.*targets: \[pooler\.dense\]"
    ):
        _place(bert, {"strategy": "all"}, {"targets": ["pooler.*"]})


def test_a_model_without_blocks_needs_its_modules_named():
    model = convnet()
    program = trace(model, image_inputs(), training=False)
    sites = find_sites(program)
    assert all(s.layer is None for s in sites)
    spec = load_spec(
        {"placement": {"strategy": "all"}, "adapters": [{"method": "lora", "rank": 2}]}, methods()
    )
    with pytest.raises(SpecError, match="has no candidate site in this model.*name the modules"):
        place(spec, sites, methods())
    named = {"method": "lora", "rank": 2, "targets": ["conv3", "head"]}
    spec = load_spec({"placement": {"strategy": "all"}, "adapters": [named]}, methods())
    assert [a.path for a in place(spec, sites, methods()).sites] == ["conv3", "head"]
