"""The site table on tiny Llama: exactly the adapted sites, their parameter counts, sorting,
filtering, shared-input groups, the NFN column and JSON."""

import json

import pytest

import peftc
from peftc.inspect.table import (
    filter_rows,
    format_table,
    rows_json,
    site_rows,
    sort_rows,
    summary_line,
)
from tests.models import tiny_llama, token_inputs

SPEC = {
    "adapters": [
        {"method": "lora", "targets": ["q_proj", "v_proj"], "rank": 4, "alpha": 8},
        {"method": "lora", "targets": ["*.layers.1.mlp.down_proj"], "rank": 2},
    ]
}


@pytest.fixture(scope="module")
def adapted():
    return peftc.compile(tiny_llama(), SPEC, token_inputs())


def _tensor_counts(adapted) -> dict[str, int]:
    """Trainable adapter elements per site, read from the adapter tensors themselves."""
    counts: dict[str, int] = {}
    for name, p in adapted.named_adapter_parameters().items():
        if p.requires_grad:
            path = name.removeprefix("adapters.").rsplit(".", 1)[0]
            counts[path] = counts.get(path, 0) + p.numel()
    return counts


def test_rows_are_exactly_the_adapted_sites_with_their_parameter_counts(adapted):
    rows = site_rows(adapted)
    expected = {f"model.layers.{i}.self_attn.{m}" for i in (0, 1) for m in ("q_proj", "v_proj")} | {
        "model.layers.1.mlp.down_proj"
    }
    assert [r.path for r in rows] == [s.path for s in adapted.sites if s.path in expected]
    counts = _tensor_counts(adapted)
    assert set(counts) == expected
    for r in rows:
        assert r.params == counts[r.path], r.path
        assert r.cost["params"] == r.params  # the sympy formula agrees with the tensors
    by_path = {r.path: r for r in rows}
    # LoRA: r * (in + out); hidden 64, kv 2 heads * 16 = 32, intermediate 96
    assert by_path["model.layers.0.self_attn.q_proj"].params == 4 * (64 + 64)
    assert by_path["model.layers.0.self_attn.v_proj"].params == 4 * (64 + 32)
    assert by_path["model.layers.1.mlp.down_proj"].params == 2 * (96 + 64)
    assert by_path["model.layers.1.mlp.down_proj"].rank == 2
    assert by_path["model.layers.1.mlp.down_proj"].rule == 1
    assert sum(r.params for r in rows) == adapted.plan.trainable_parameters()
    assert summary_line(adapted).startswith(f"5 of {len(adapted.sites)} sites adapted (lora)")


def test_include_all_lists_every_site_and_marks_the_unadapted(adapted):
    rows = site_rows(adapted, include_all=True)
    assert [r.path for r in rows] == [s.path for s in adapted.sites]
    unadapted = [r for r in rows if not r.adapted]
    assert len(unadapted) == len(adapted.sites) - 5
    assert all(r.method is None and r.params == 0 and r.cost is None for r in unadapted)


def test_groups_mark_sites_that_share_an_input(adapted):
    rows = {r.path: r for r in site_rows(adapted, include_all=True)}
    q0, k0, v0 = (rows[f"model.layers.0.self_attn.{m}"] for m in ("q_proj", "k_proj", "v_proj"))
    assert q0.group_id is not None and q0.group_id == k0.group_id == v0.group_id
    assert rows["model.layers.1.self_attn.q_proj"].group_id != q0.group_id
    assert rows["model.layers.0.self_attn.o_proj"].group_id is None  # reads its own input
    assert set(q0.group) == {q0.path, k0.path, v0.path}


def test_sort_and_filter(adapted):
    rows = site_rows(adapted)
    desc = sort_rows(rows, "-params")
    assert [r.params for r in desc] == sorted((r.params for r in rows), reverse=True)
    # ties keep graph order: layer 0's q_proj before layer 1's
    assert desc[0].path == "model.layers.0.self_attn.q_proj"
    assert [r.rank for r in sort_rows(rows, "rank")] == [2, 4, 4, 4, 4]
    assert [r.path for r in sort_rows(rows, "path")] == sorted(r.path for r in rows)
    layer1 = filter_rows(rows, ["*.layers.1.*"])
    assert {r.layer for r in layer1} == {1} and len(layer1) == 3
    assert [r.path for r in filter_rows(rows, ["q_proj"])] == [
        "model.layers.0.self_attn.q_proj",
        "model.layers.1.self_attn.q_proj",
    ]
    assert filter_rows(rows, None) == rows
    with pytest.raises(ValueError, match="cannot sort by 'size'; sort keys: order, path"):
        sort_rows(rows, "size")


def test_text_table_and_nfn_column(adapted, monkeypatch):
    rows = site_rows(adapted)
    text = format_table(rows)
    lines = text.splitlines()
    assert len(lines) == 2 + len(rows)
    assert "NFN" not in lines[0] and "params" in lines[0]
    assert any(
        line.startswith("model.layers.1.mlp.down_proj") and " 320 " in line for line in lines
    )
    monkeypatch.setattr(adapted.plan, "site_scores", {"model.layers.0.self_attn.q_proj": 1.25})
    scored = site_rows(adapted)
    assert scored[0].nfn == 1.25 and scored[1].nfn is None
    text = format_table(scored)
    assert "NFN" in text.splitlines()[0] and "1.250" in text
    assert sort_rows(scored, "nfn")[0].path == "model.layers.0.self_attn.q_proj"  # None last


def test_json_rows_and_tokens(adapted):
    data = json.loads(json.dumps(rows_json(site_rows(adapted, tokens=10))))
    q0 = data[0]
    assert q0["path"] == "model.layers.0.self_attn.q_proj"
    assert q0["in_features"] == 64 and q0["out_features"] == 64 and q0["dtype"] == "float32"
    assert q0["hyperparams"]["rank"] == 4
    # forward FLOPs: 2·T·r·(in + out) + 2·T·out, at T = 10 tokens
    assert q0["cost"]["flops_forward"] == 2 * 10 * 4 * 128 + 2 * 10 * 64
    with pytest.raises(ValueError, match="tokens must be 1 or more"):
        site_rows(adapted, tokens=0)
