"""Data-parallel training (peftc.distributed.replicate) with two CPU processes on gloo: each
step's loss is the single-process loss on the whole batch, and the adapter saved once by the
ranks is the single-process one, which PEFT loads (fp32: 1e-5 relative)."""

import copy
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from peft import PeftModel

import peftc
from tests.models import tiny_llama, token_inputs

SPEC = {"adapters": [{"method": "lora", "targets": ["q_proj", "v_proj"], "rank": 4}]}
WORLD, STEPS, TOL = 2, 5, 1e-5


def batch() -> dict:
    return token_inputs(4, 16, seed=3)


def train(model, params, inputs: dict) -> list[float]:
    opt = torch.optim.AdamW(params, lr=1e-2)
    losses = []
    for _ in range(STEPS):
        logits, ids = model(**inputs).logits, inputs["input_ids"]  # next-token loss, mean
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def _rank(rank: int, init: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=WORLD)
    try:
        adapted = peftc.compile(tiny_llama(layers=1), SPEC, token_inputs()).train()
        half = {k: v[2 * rank : 2 * rank + 2] for k, v in batch().items()}
        model = peftc.distributed.replicate(adapted)
        losses = train(model, adapted.trainable_parameters(), half)
        torch.save(losses, Path(out) / f"losses{rank}.pt")
        peftc.distributed.save_adapter(model, str(Path(out) / "adapter"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    mp.spawn(_rank, args=(f"file://{out}/rendezvous", str(out)), nprocs=WORLD, join=True)
    return out


def test_each_step_is_the_whole_batch_step(ranks):
    single = peftc.compile(tiny_llama(layers=1), SPEC, token_inputs()).train()
    expected = train(single, single.trainable_parameters(), batch())
    assert expected[-1] < expected[0]  # it trains
    per_rank = [torch.load(ranks / f"losses{r}.pt") for r in range(WORLD)]
    assert per_rank[0] != per_rank[1]  # each rank saw its own half
    got = [sum(step) / WORLD for step in zip(*per_rank, strict=True)]
    torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), rtol=TOL, atol=0)


def test_the_saved_adapter_is_whole_and_loads_into_peft(ranks):
    assert sorted(p.name for p in (ranks / "adapter").iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    base = tiny_llama(layers=1)
    single = peftc.compile(copy.deepcopy(base), SPEC, token_inputs()).train()
    train(single, single.trainable_parameters(), batch())
    single.eval()
    theirs = PeftModel.from_pretrained(copy.deepcopy(base), ranks / "adapter").eval()
    x = token_inputs(3, 11, seed=8)
    with torch.no_grad():
        ours = single(**x).logits
        assert (ours - base(**x).logits).abs().max() > 1e-3
        torch.testing.assert_close(theirs(**x).logits, ours, rtol=TOL, atol=TOL)


def test_without_a_process_group_the_error_says_how_to_start_one():
    adapted = peftc.compile(tiny_llama(layers=1), SPEC, token_inputs())
    with pytest.raises(RuntimeError, match="init_process_group"):
        peftc.distributed.replicate(adapted)
