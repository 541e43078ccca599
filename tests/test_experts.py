"""Mixture-of-experts weights as sites: Mixtral's 3-D `gate_up_proj` [E, 2I, H] and
`down_proj` [E, H, I] (transformers 5, used through its grouped matmul) take LoRA per expert,
as PEFT's `target_parameters` does. Oracle: PEFT on the same model, both ways (its checkpoint
read by peftc, peftc's read by PEFT), fp32 at 1e-5; then training, merge and the ONNX export
(onnxruntime, 1e-4)."""

import copy

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

import peftc
from passes.cleanup import Cleanup
from passes.merge import op_multiset
from rewrite.spec import SpecError
from rewrite.trace import trace
from tests.architectures import mixtral

TOL, ONNX_TOL = 1e-5, 1e-4
EXPERTS = ["experts.gate_up_proj", "experts.down_proj"]


@pytest.fixture(scope="module")
def base():
    return mixtral()


@pytest.fixture(scope="module")
def peft_dir(base, tmp_path_factory):
    """A PEFT checkpoint: LoRA on q_proj and, through target_parameters, on both experts."""
    model, _ = base
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj"],
        target_parameters=EXPERTS,
        init_lora_weights=False,
    )
    theirs = get_peft_model(copy.deepcopy(model), config).eval()
    out = tmp_path_factory.mktemp("peft")
    theirs.save_pretrained(out)
    return out, theirs


def _logits(model, x):
    with torch.no_grad():
        return model(**x).logits


def test_expert_weights_are_sites_with_an_expert_dimension(base):
    model, x = base
    adapted = peftc.compile(model, {"adapters": [{"method": "lora", "targets": EXPERTS}]}, x)
    got = {
        a.site.module_type: (a.site.experts, a.site.in_features, a.site.out_features)
        for a in adapted.plan
    }
    assert got == {"mlp.experts.gate_up_proj": (4, 64, 192), "mlp.experts.down_proj": (4, 96, 64)}
    A = adapted.named_adapter_parameters()["adapters.model.layers.0.mlp.experts.down_proj.lora_A"]
    assert tuple(A.shape) == (4, 8, 96)  # one A per expert
    plain = peftc.compile(
        model, {"adapters": [{"method": "lora", "targets": "all-linear", "rank": 2}]}, x
    )
    assert all(a.site.experts is None for a in plain.plan)  # all-linear: not experts (PEFT's too)
    with pytest.raises(SpecError, match="no input to drop out"):
        peftc.compile(
            model, {"adapters": [{"method": "lora", "targets": EXPERTS, "dropout": 0.1}]}, x
        )


def test_a_peft_target_parameters_checkpoint_gives_peft_outputs(base, peft_dir):
    model, x = base
    directory, theirs = peft_dir
    expected = _logits(theirs, x)
    with theirs.disable_adapter():
        assert (expected - _logits(theirs, x)).abs().max() > 1e-3
    ours = peftc.from_peft(copy.deepcopy(model), directory, x).eval()
    assert sum(a.site.experts is not None for a in ours.plan) == 2
    fresh = {"input_ids": torch.randint(0, 128, (3, 9), generator=torch.Generator().manual_seed(5))}
    torch.testing.assert_close(_logits(ours, fresh), _logits(theirs, fresh), atol=TOL, rtol=TOL)
    ids, kwargs = fresh["input_ids"][:1, :4], {"max_new_tokens": 5, "do_sample": False}
    with torch.no_grad():
        expected_tokens = theirs.generate(input_ids=ids, **kwargs)
    assert torch.equal(ours.generate(input_ids=ids, **kwargs), expected_tokens)


def test_saving_writes_target_parameters_that_peft_loads(base, peft_dir, tmp_path):
    model, x = base
    directory, theirs = peft_dir
    ours = peftc.from_peft(copy.deepcopy(model), directory, x).eval()
    ours.save_adapter(tmp_path)
    again = PeftModel.from_pretrained(copy.deepcopy(model), tmp_path).eval()
    assert again.peft_config["default"].target_parameters == {
        "model.layers.0.mlp.experts.gate_up_proj",
        "model.layers.0.mlp.experts.down_proj",
    }
    torch.testing.assert_close(_logits(again, x), _logits(theirs, x), atol=TOL, rtol=TOL)


def test_experts_train_merge_and_export(base, tmp_path):
    model, x = base
    spec = {"adapters": [{"method": "lora", "targets": EXPERTS, "rank": 2}]}
    adapted = peftc.compile(copy.deepcopy(model), spec, x).train()
    before = {k: p.detach().clone() for k, p in adapted.named_adapter_parameters().items()}
    opt = torch.optim.AdamW(adapted.trainable_parameters(), lr=1e-2)
    adapted(**x).logits.square().mean().backward()
    opt.step()
    after = adapted.named_adapter_parameters()
    assert all(not torch.equal(after[k], v) for k, v in before.items())
    adapted.eval()
    ours = _logits(adapted, x)
    assert (ours - _logits(model, x)).abs().max() > 1e-4
    merged = adapted.merge()
    torch.testing.assert_close(_logits(merged, x), ours, atol=TOL, rtol=TOL)
    program = trace(model, x, training=False)
    Cleanup()(program)
    assert op_multiset(merged) == op_multiset(program.graph)
    report = adapted.export_onnx(str(tmp_path / "moe.onnx"))
    assert len(report.max_errors) == 2 and max(report.max_errors.values()) <= ONNX_TOL


def test_per_block_checkpointing_keeps_the_expert_gradients(base):
    """Per-block activation checkpointing with expert adapters (and q_proj's): the same loss
    and adapter gradients as without it."""
    model, x = base
    spec = {"adapters": [{"method": "lora", "targets": [*EXPERTS, "q_proj"], "rank": 2}]}
    adapted = peftc.compile(copy.deepcopy(model), spec, x).train()
    for p in adapted.trainable_parameters():
        torch.nn.init.normal_(p, std=0.05)
    runs = []
    for checkpointed in (False, True):
        if checkpointed:
            adapted.gradient_checkpointing_enable()
        loss = adapted(**x).logits.square().mean()
        loss.backward()
        grads = {k: p.grad.clone() for k, p in adapted.named_adapter_parameters().items()}
        adapted.zero_grad(set_to_none=True)
        runs.append((loss.detach(), grads))
    assert adapted.pipeline.runners.get(True) is not None  # the per-block pieces run
    (loss, grads), (loss_ac, grads_ac) = runs
    torch.testing.assert_close(loss_ac, loss, atol=TOL, rtol=TOL)
    for name, grad in grads.items():
        assert grad.abs().max() > 0, name
        torch.testing.assert_close(grads_ac[name], grad, atol=TOL, rtol=TOL)


def test_the_html_report_pictures_an_expert_weight(base):
    from peftc.inspect.report import html_report

    model, x = base
    spec = {"adapters": [{"method": "lora", "targets": EXPERTS[1:], "rank": 2}]}
    adapted = peftc.compile(copy.deepcopy(model), spec, x)
    path = "model.layers.0.mlp.experts.down_proj"
    html = html_report(adapted, pictures=[path])
    assert f'<figure data-site="{path}">' in html and "mlp.experts.down_proj" in html
