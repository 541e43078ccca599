"""The per-pass trace: every pass in order, rule matches and declines, and the insertion diff."""

import json

import pytest

import peftc
from peftc.inspect.passes_trace import format_trace, trace_json
from rewrite.trace import trace
from tests.models import tiny_llama, token_inputs

SPEC = {"adapters": [{"method": "lora", "targets": ["q_proj", "v_proj"], "rank": 4}]}


@pytest.fixture(scope="module")
def adapted():
    model = tiny_llama(layers=1)
    base_nodes = len(trace(model, token_inputs(), training=False).graph.nodes)
    out = peftc.compile(model, SPEC, token_inputs())
    out.base_nodes = base_nodes  # the graph size before any pass, from a fresh trace
    return out


def test_records_every_pass_in_order(adapted):
    records = adapted.pass_records
    assert records[0].name == "insert_adapters" and records[-1].name == "cleanup"
    # each pass starts from the graph the previous one left: nothing ran unrecorded between
    assert records[0].nodes_before == adapted.base_nodes
    for before, after in zip(records, records[1:]):
        assert after.nodes_before == before.nodes_after
    assert records[-1].nodes_after == len(adapted.program().graph.nodes)
    assert all(r.seconds > 0 for r in records)
    assert records[0].modified and records[0].nodes_after > records[0].nodes_before


def test_rule_matches_and_declines_by_reason(adapted):
    stats = adapted.pass_records[0].rules["insert_adapter"]
    assert stats.matches == 2  # q_proj and v_proj
    assert dict(stats.declines) == {"not targeted by the spec": len(adapted.sites) - 2}
    data = json.loads(json.dumps(trace_json(adapted.pass_records)))
    assert [d["name"] for d in data] == [r.name for r in adapted.pass_records]
    assert data[0]["rules"]["insert_adapter"] == {
        "matches": 2,
        "declines": {"not targeted by the spec": len(adapted.sites) - 2},
    }
    assert "diff" not in data[0]
    with_code = adapted.pass_trace(diffs=True)
    assert trace_json(with_code, diff=True)[0]["diff"] == with_code[0].diff


def test_a_compile_keeps_no_code_and_inspect_replays_for_diffs():
    """Without debug no pass's code is generated (the graph is recompiled once); asking for
    diffs replays the pipeline on a fresh trace and gives the diffs a debug compile prints."""
    plain = peftc.compile(tiny_llama(layers=1), SPEC, token_inputs())
    assert all(r.code_before is None and r.code_after is None for r in plain.pass_records)
    debug = peftc.compile(tiny_llama(layers=1), SPEC, token_inputs(), debug=True)
    replayed = plain.pass_trace(diffs=True)
    assert [r.seconds for r in replayed] == [r.seconds for r in plain.pass_records]
    assert [r.diff for r in replayed] == [r.diff for r in debug.pass_records]
    assert replayed[0].diff and plain.pass_trace(diffs=True) is replayed  # replayed once


def test_insertion_diff_adds_the_adapter_ops(adapted):
    diff = adapted.pass_trace(diffs=True)[0].diff
    added = [line[1:].strip() for line in diff.splitlines() if line.startswith("+")]
    removed = [line for line in diff.splitlines() if line.startswith("-")]
    for a in adapted.plan:
        a_name = a.site.path.replace(".", "_") + "_lora_a"
        b_name = a.site.path.replace(".", "_") + "_lora_b"
        # x @ Aᵀ, then @ Bᵀ: the two LoRA matmuls, reading the new adapter placeholders
        a_ops = [x for x in added if x.split(";")[0].endswith(f", adapters_{a_name})")]
        b_ops = [x for x in added if x.split(";")[0].endswith(f", adapters_{b_name})")]
        assert len(a_ops) == 1 and "torch.ops.aten.linear.default(" in a_ops[0], a.site.path
        assert len(b_ops) == 1 and "torch.ops.aten.linear.default(" in b_ops[0], a.site.path
        # ... and the residual add that feeds the base op's old users
        out = b_ops[0].split(" = ")[0]
        assert any(x.startswith("mul") and f"({out}, 2.0)" in x for x in added)
    assert sum(1 for x in added if "torch.ops.aten.add.Tensor(linear" in x) == len(adapted.plan)
    assert any(x.startswith("-def forward(") for x in removed)  # new placeholders


def test_text_trace_with_and_without_diffs(adapted):
    plain = format_trace(adapted.pass_records)
    assert plain.splitlines()[0].lstrip().startswith("1. insert_adapters")
    n = len(adapted.sites) - 2
    assert f"rule insert_adapter: 2 matches; declined {n}: not targeted by the spec ({n})" in plain
    assert "--- before insert_adapters" not in plain
    full = format_trace(adapted.pass_trace(diffs=True), diff=True)
    assert "--- before insert_adapters" in full and "+++ after insert_adapters" in full
    assert full.index("insert_adapters") < full.index("cleanup")
