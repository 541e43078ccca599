"""Slices of packed projections as sites: Phi-3's qkv_proj and gate_up_proj (sliced with
`slice` and `chunk`) and GPT-2's c_attn (an addmm, viewed, then `split`).

LoRA on the q and v slices trains only those rows: the oracle is the formula written here, a
forward hook on the eager model adding s·B_q A_q x to the q rows and s·B_v A_v x to the v rows
(fp32, 1e-5). After merging, the k rows equal the base weight bit for bit. Fusion, ONNX (merged,
and the multi-adapter graph) and generate work on slices; checkpoints are peftc's own format
(PEFT has none for slices) and a PEFT-format save is refused."""

import copy
import json
from functools import partial

import pytest
import torch

import peftc
from lowering.multi_adapter import export_multi
from passes.cleanup import Cleanup
from passes.merge import merged_weights, op_multiset
from peftc.inspect.table import filter_rows, format_table, site_rows
from rewrite.spec import SpecError
from rewrite.trace import trace
from tests.models import tiny_gpt2, tiny_phi3, token_inputs

TOL = 1e-5  # fp32
# architecture: (model, packed module, the q and v slice targets, their rows)
CASES = {
    "phi3": (partial(tiny_phi3, layers=1), "self_attn.qkv_proj", ["*.qkv_proj[q]", "*.qkv_proj[v]"], [(0, 64), (96, 128)]),
    "gpt2": (partial(tiny_gpt2, layers=1), "attn.c_attn", ["*.c_attn[0:64]", "*.c_attn[128:192]"], [(0, 64), (128, 192)]),
}  # fmt: skip


def spec(targets, seed=0):
    return {"adapters": [{"method": "lora", "targets": targets, "rank": 4}], "seed": seed}


@pytest.fixture(scope="module", params=list(CASES))
def case(request):
    """(name, base, adapted after two training steps, the adapter values before them)."""
    make, _, targets, _ = CASES[request.param]
    base = make()
    adapted = peftc.compile(base, spec(targets), token_inputs()).train()
    before = {k: p.detach().clone() for k, p in adapted.named_adapter_parameters().items()}
    opt = torch.optim.AdamW(adapted.trainable_parameters(), lr=1e-2)
    for _ in range(2):
        torch.manual_seed(0)
        adapted(**token_inputs()).logits.square().mean().backward()
        opt.step()
        opt.zero_grad()
    return request.param, base, adapted.eval(), before


def _logits(model, x):
    with torch.no_grad():
        return model(**x).logits


def _oracle(base, adapted, module_type):
    """The base model with a hook on each packed module: its output plus, at each adapted
    slice's rows, s·(x Aᵀ) Bᵀ (the LoRA formula, written here)."""
    model = copy.deepcopy(base)
    state = adapted.state()
    modules = dict(model.named_modules())
    hooks = []
    for a in adapted.plan:
        start, end = a.site.rows
        A = state[f"adapters.{a.site.state_path}.lora_A"].detach()
        B = state[f"adapters.{a.site.state_path}.lora_B"].detach()
        s = a.method.scaling

        def hook(module, args, out, start=start, end=end, A=A, B=B, s=s):
            delta = torch.zeros_like(out)
            delta[..., start:end] = s * (args[0] @ A.T) @ B.T
            return out + delta

        assert a.site.parent.endswith(module_type)
        hooks.append(modules[a.site.parent].register_forward_hook(hook))
    return model


def test_the_site_table_lists_the_slices_named_from_the_config(case):
    name, _, adapted, _ = case
    rows = site_rows(adapted, include_all=True)
    parts = {
        r.path.rsplit(".", 1)[-1]: r.part
        for r in rows
        if r.path.startswith("model.layers.0." if name == "phi3" else "transformer.h.0.")
    }
    if name == "phi3":  # GQA: 4 heads and 2 kv heads of 16; gate and up of 96 each
        assert parts == {
            "qkv_proj": None, "qkv_proj[0:64]": "q", "qkv_proj[64:96]": "k",
            "qkv_proj[96:128]": "v", "o_proj": None, "gate_up_proj": None,
            "gate_up_proj[0:96]": "gate", "gate_up_proj[96:192]": "up", "down_proj": None,
        }  # fmt: skip
    else:
        assert {k: v for k, v in parts.items() if "c_attn" in k} == {
            "c_attn": None,
            "c_attn[0:64]": "q",
            "c_attn[64:128]": "k",
            "c_attn[128:192]": "v",
        }
    assert "[0:64] (q)" in format_table(rows)
    q = next(r for r in rows if r.part == "q")
    assert [r.path for r in filter_rows(rows, [q.path])] == [q.path]  # brackets and all
    assert [a.site.rows for a in adapted.plan][:2] == CASES[name][3]


def test_slices_train_only_their_rows_and_equal_the_formula(case):
    name, base, adapted, before = case
    moved = [
        k for k, p in adapted.named_adapter_parameters().items() if not torch.equal(p, before[k])
    ]
    assert len(moved) == len(before)  # every A and B trained
    x = token_inputs(3, 9, seed=5)
    ours = _logits(adapted, x)
    assert (ours - _logits(base, x)).abs().max() > 1e-3
    torch.testing.assert_close(
        ours, _logits(_oracle(base, adapted, CASES[name][1]), x), atol=TOL, rtol=TOL
    )


def test_merging_leaves_the_other_rows_exactly_the_base_weight(case):
    name, base, adapted, _ = case
    merged = adapted.merge()
    x = token_inputs(3, 9, seed=5)
    torch.testing.assert_close(_logits(merged, x), _logits(adapted, x), atol=TOL, rtol=TOL)
    program = trace(base, token_inputs(), training=False)
    Cleanup()(program)
    assert op_multiset(merged) == op_multiset(program.graph)
    site = adapted.plan.assignments[0].site
    W = dict(base.named_parameters())[site.weight].detach()
    W_merged = merged_weights(adapted.plan.assignments, adapted.state())[site.owner]
    rows, new = (W, W_merged) if site.op == "linear" else (W.t(), W_merged.t())
    (q0, q1), (v0, v1) = CASES[name][3]
    assert torch.equal(new[q1:v0], rows[q1:v0])  # k: untouched, bit for bit
    assert not torch.equal(new[q0:q1], rows[q0:q1]) and not torch.equal(new[v0:v1], rows[v0:v1])


def test_the_q_and_v_slices_share_one_fused_matmul(case):
    name, _, adapted, _ = case
    record = next(r for r in adapted.pass_records if r.name == "fuse_siblings")
    layers = {a.site.layer for a in adapted.plan}
    assert record.rules["fuse_shared_input_matmuls"].matches == len(layers)  # one per layer


def test_merged_and_multi_adapter_onnx_verify(case, tmp_path):
    name, base, adapted, _ = case
    report = adapted.export_onnx(tmp_path / "merged.onnx")
    assert len(report.max_errors) == 2 and max(report.max_errors.values()) <= 1e-4
    # a second adapter on the same base, on the whole packed module: one graph serves both
    packed = CASES[name][1].rsplit(".", 1)[-1]
    other = peftc.compile(base, spec([packed], seed=3), token_inputs()).eval()
    for p in other.trainable_parameters():
        torch.nn.init.normal_(p, std=0.05)
    report = export_multi([adapted, other], tmp_path / "multi.onnx")
    assert len(report.max_errors) == 2 and max(report.max_errors.values()) <= 1e-4


def test_checkpoints_are_peftc_own_and_a_peft_save_is_refused(case, tmp_path):
    name, base, adapted, _ = case
    with pytest.raises(ValueError, match="PEFT adapts whole modules only.*format='auto'"):
        adapted.save_adapter(tmp_path / "peft", format="peft")
    adapted.save_adapter(tmp_path / "own")
    config = json.loads((tmp_path / "own" / "adapter_config.json").read_text())
    assert config["peft_type"] == "PEFTC_LORA"
    assert all("[" in t for t in config["target_modules"])
    again = peftc.from_peft(copy.deepcopy(base), tmp_path / "own", token_inputs()).eval()
    x = token_inputs(2, 7, seed=9)
    assert torch.equal(_logits(again, x), _logits(adapted, x))


@pytest.mark.parametrize("case", ["phi3"], indirect=True)
def test_generate_reads_the_slices(case):
    name, base, adapted, _ = case
    ids = token_inputs(1, 5, seed=2)["input_ids"]
    oracle = _oracle(base, adapted, CASES[name][1])
    kwargs = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    expected = oracle.generate(input_ids=ids, **kwargs)
    assert not torch.equal(expected, base.generate(input_ids=ids, **kwargs))
    assert torch.equal(adapted.generate(input_ids=ids, **kwargs), expected)


def test_slice_targets_select_only_slices_and_errors_name_the_fix():
    base = tiny_phi3(layers=1)
    x = token_inputs()
    whole = peftc.compile(base, {"adapters": [{"method": "lora", "targets": "all-linear"}]}, x)
    assert all(a.site.rows is None for a in whole.plan)  # all-linear: modules, never slices
    with pytest.raises(SpecError, match=r"matches no slice.*qkv_proj\[0:64\] \(q\)"):
        peftc.compile(base, spec(["*.qkv_proj[0:65]"]), x)
    with pytest.raises(SpecError, match="adapted whole and its slice"):
        peftc.compile(base, spec(["qkv_proj", "*.qkv_proj[k]"]), x)


def test_the_html_report_pictures_a_slice(case):
    from peftc.inspect.report import html_report

    name, _, adapted, _ = case
    path = adapted.plan.assignments[0].site.path  # the q slice of the first layer
    html = html_report(adapted, pictures=[path])
    assert f'<figure data-site="{path}">' in html and "<svg" in html
