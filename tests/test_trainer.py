"""transformers' Trainer on an adapted tiny Llama: the forward's signature, the loss from
the traced graph, 30 training steps whose loss falls, PEFT-format checkpoints that PEFT loads
with equal outputs (fp32, 1e-5), and resuming from one to the same adapter as a straight run."""

import copy
import inspect

import pytest
import torch
from transformers import Trainer as HFTrainer
from transformers import TrainingArguments

import peftc
from peftc.hf import Trainer
from tests.models import tiny_llama

TOL = 1e-5
# lm_head too: the tiny model's frozen head alone cannot scale its logits far from uniform
SPEC = {"adapters": [{"method": "lora", "targets": ["q_proj", "v_proj", "lm_head"], "rank": 4}]}


class Sequences(torch.utils.data.Dataset):
    """Eight fixed sequences over four of the 128 tokens: what the adapters learn first is to
    put the probability there (the loss falls from ln 128 towards ln 4)."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.ids = 10 + torch.randint(0, 4, (8, 16), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        ids = self.ids[i]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def example() -> dict:
    return {k: v.unsqueeze(0).repeat(2, 1) for k, v in Sequences()[0].items()}


def adapted_llama():
    base = tiny_llama(layers=1)
    return base, peftc.compile(copy.deepcopy(base), SPEC, example())


def args(out, steps: int) -> TrainingArguments:
    return TrainingArguments(
        output_dir=str(out),
        max_steps=steps,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        logging_steps=1,
        save_steps=10,
        report_to=[],
        use_cpu=True,
        seed=0,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """30 steps in one run, checkpoints every 10."""
    base, adapted = adapted_llama()
    out = tmp_path_factory.mktemp("trainer")
    trainer = Trainer(model=adapted, args=args(out, 30), train_dataset=Sequences())
    trainer.train()
    return base, adapted, trainer, out


def test_forward_reads_like_the_base_model():
    """Trainer keeps the columns the forward names, finds `labels` in it, and takes the loss
    as the model's own (no num_items_in_batch passed in)."""
    base, adapted = adapted_llama()
    names = list(inspect.signature(adapted.forward).parameters)
    assert names == list(inspect.signature(base.forward).parameters)
    trainer = HFTrainer(model=adapted, args=args("unused", 1), train_dataset=Sequences())
    assert trainer.label_names == ["labels"] and not trainer.model_accepts_loss_kwargs
    batch = example()
    loss = adapted.train()(**batch).loss
    assert loss.grad_fn is not None  # in the graph, differentiable
    torch.testing.assert_close(loss, base(**batch).loss, atol=TOL, rtol=TOL)  # B = 0 at init
    with pytest.raises(TypeError, match=r"\(missing \['labels'\]\)\. Call it with the same"):
        adapted(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])


def test_thirty_steps_lower_the_loss(straight):
    _, _, trainer, _ = straight
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 30
    assert sum(losses[-3:]) / 3 < 0.7 * sum(losses[:3]) / 3  # deterministic: seeds fixed


def test_checkpoint_is_a_peft_adapter_that_peft_loads(straight):
    from peft import PeftModel

    base, adapted, _, out = straight
    checkpoint = out / "checkpoint-30"
    files = {p.name for p in checkpoint.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json"} <= files
    assert "model.safetensors" not in files  # the adapter only, as for PEFT models
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), str(checkpoint)).eval()
    x = {k: v for k, v in Sequences()[3].items() if k != "labels"}
    x = {k: v.unsqueeze(0) for k, v in x.items()}
    with torch.no_grad():
        expected = peft_model(**x).logits
        assert (expected - base(**x).logits).abs().max() > 1e-3  # trained, not the base
        batch = {**x, "labels": x["input_ids"]}
        torch.testing.assert_close(adapted.eval()(**batch).logits, expected, atol=TOL, rtol=TOL)


def test_resuming_from_a_checkpoint_reaches_the_straight_runs_adapter(straight, tmp_path):
    _, adapted, _, out = straight
    _, again = adapted_llama()
    trainer = Trainer(model=again, args=args(tmp_path, 30), train_dataset=Sequences())
    trainer.train(resume_from_checkpoint=str(out / "checkpoint-20"))
    assert trainer.state.global_step == 30
    ours = again.named_adapter_parameters()
    for name, p in adapted.named_adapter_parameters().items():
        torch.testing.assert_close(ours[name], p, atol=TOL, rtol=TOL)


def saved_elements(adapted, batch) -> int:
    """Elements autograd keeps for the backward of one step (then runs the backward)."""
    seen = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: seen.append(t) or t, lambda t: t):
        loss = adapted(**batch).loss
    loss.backward()
    return sum(t.numel() for t in seen)


def test_activation_checkpointing_flag_recomputes_with_the_same_gradients(tmp_path):
    """TrainingArguments(activation_checkpointing=True) reaches the model (Trainer calls
    activation_checkpointing_enable); the recomputed forward gives the same gradients."""
    _, adapted = adapted_llama()
    adapted.train()
    batch = example()
    init = {n: p.detach().clone() for n, p in adapted.named_adapter_parameters().items()}
    kept = saved_elements(adapted, batch)
    plain = {
        n: p.grad.clone()
        for n, p in adapted.named_adapter_parameters().items()
        if p.grad is not None
    }
    adapted.zero_grad(set_to_none=True)
    run = args(tmp_path, 1)
    run.activation_checkpointing = True
    Trainer(model=adapted, args=run, train_dataset=Sequences()).train()
    assert adapted.is_gradient_checkpointing
    with torch.no_grad():  # back to the values the plain gradients were taken at
        for name, p in adapted.named_adapter_parameters().items():
            p.copy_(init[name])
    adapted.zero_grad(set_to_none=True)
    # checkpointed per block: the blocks keep their inputs, not their activations
    assert saved_elements(adapted, batch) < kept
    for name, grad in plain.items():
        p = adapted.named_adapter_parameters()[name]
        torch.testing.assert_close(p.grad, grad, atol=TOL, rtol=TOL)
    adapted.gradient_checkpointing_disable()
    assert not adapted.is_gradient_checkpointing
