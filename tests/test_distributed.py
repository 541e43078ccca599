"""Training on two CPU processes over gloo: DDP (`peftc.distributed.replicate`) and FSDP2
(`peftc.distributed.fully_shard`, per block; eager, with per-block activation checkpointing
and Inductor compile, with bf16 mixed precision, and on an NF4-quantized base).

One spawn runs every variant (each rank trains on its half of a fixed global batch); the
tests compare what the ranks wrote with a single process on the whole batch: each step's loss
within 1e-5 relative in fp32 (bf16 compute: 3e-2, its 8-bit mantissa over five steps), the
adapter saved once by the ranks whole and loadable into PEFT with the single process's
outputs, and each rank's share of the sharded base weights half of the whole."""

import copy
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.distributed.fsdp import MixedPrecisionPolicy

import peftc
from tests.models import tiny_llama, token_inputs

SPEC = {"adapters": [{"method": "lora", "targets": ["q_proj", "v_proj"], "rank": 4}]}
# a step counter (a 0-d tensor, which FSDP2 cannot shard) that the ramp reads at every step
SINGLORA = {
    "adapters": [{"method": "singlora", "targets": ["q_proj"], "rank": 4, "ramp_up_steps": 3}]
}
WORLD, STEPS, TOL, BF16_TOL = 2, 5, 1e-5, 3e-2
EVAL = token_inputs(3, 11, seed=8)


def batch() -> dict:
    return token_inputs(4, 16, seed=3)


def train(model, params, inputs: dict) -> list[float]:
    opt = torch.optim.AdamW(params, lr=1e-2)
    losses = []
    for _ in range(STEPS):
        logits, ids = model(**inputs).logits, inputs["input_ids"]  # next-token loss, mean
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def adapted(layers: int = 2, spec: dict = SPEC, **options) -> torch.nn.Module:
    return peftc.compile(tiny_llama(layers=layers), spec, token_inputs(), **options).train()


def sliced_and_experts() -> dict[str, torch.nn.Module]:
    """LoRA on the q and v rows of Phi-3's packed qkv_proj, and on Mixtral's 3-D expert
    weights: sites that are not whole linear layers."""
    from tests.architectures import mixtral
    from tests.models import tiny_phi3

    def lora(targets: list[str]) -> dict:
        return {"adapters": [{"method": "lora", "targets": targets, "rank": 4}]}

    experts = ["experts.gate_up_proj", "experts.down_proj", "q_proj"]
    return {
        "phi3": peftc.compile(tiny_phi3(layers=1), lora(["*.qkv_proj[q]", "*.qkv_proj[v]"]), token_inputs()),
        "mixtral": peftc.compile(mixtral()[0], lora(experts), token_inputs()),
    }  # fmt: skip


def counters(model: torch.nn.Module) -> list[int]:
    return [int(t) for n, t in model.named_adapter_parameters().items() if "singlora_t" in n]


def _rank(rank: int, init: str, out: str) -> None:
    from tests import shared_traces

    shared_traces.install()  # each variant compiles the same model: trace it once per rank
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=WORLD)
    out_dir = Path(out)
    half = {k: v[2 * rank : 2 * rank + 2] for k, v in batch().items()}
    results = {}
    try:
        model = peftc.distributed.replicate(adapted())
        results["ddp"] = train(model, model.module.trainable_parameters(), half)
        peftc.distributed.save_adapter(model, str(out_dir / "ddp"))

        sharded = peftc.distributed.fully_shard(adapted())
        base = sharded.adapted.base.parameters
        results["base_numel"] = [
            sum(p.to_local().numel() for p in base()),
            sum(p.numel() for p in base()),
        ]
        results["fsdp"] = train(sharded, sharded.trainable_parameters(), half)
        peftc.distributed.save_adapter(sharded, str(out_dir / "fsdp"))
        with torch.no_grad():
            results["fsdp_eval"] = sharded.eval()(**EVAL).logits
        again = peftc.distributed.fully_shard(adapted())  # a fresh one, from the checkpoint
        peftc.distributed.load_adapter(again, str(out_dir / "fsdp"))
        with torch.no_grad():
            results["loaded_eval"] = again.eval()(**EVAL).logits

        recomputed = peftc.distributed.fully_shard(adapted(1), activation_checkpointing=True)
        calls = []
        recomputed.blocks[0].pieces["train"].register_forward_pre_hook(lambda *_: calls.append(1))
        results["checkpointed"] = train(recomputed, recomputed.trainable_parameters(), half)
        results["piece_runs_per_step"] = len(calls) / STEPS
        torch._dynamo.reset()
        fast = peftc.distributed.fully_shard(
            adapted(1), activation_checkpointing=True, compile=True
        )
        results["compiled"] = train(fast, fast.trainable_parameters(), half)
        results["compiled_graphs"] = torch._dynamo.utils.counters["stats"]["unique_graphs"]

        bf16 = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        mixed = peftc.distributed.fully_shard(adapted(1), mp_policy=bf16)
        results["mixed"] = train(mixed, mixed.trainable_parameters(), half)
        results["mixed_dtypes"] = sorted(
            {str(p.dtype) for p in mixed.trainable_parameters()}
            | {str(p.grad.dtype) for p in mixed.trainable_parameters()}
        )
        with torch.no_grad():
            results["mixed_logits_dtype"] = str(mixed(**EVAL).logits.dtype)

        qlora = peftc.distributed.fully_shard(adapted(1, quantize="nf4"))
        codes = dict(qlora.adapted.quantized.named_parameters())
        results["codes_numel"] = [sum(c.to_local().numel() for c in codes.values())]
        results["qlora"] = train(qlora, qlora.trainable_parameters(), half)
        results["codes_after"] = {n: c.full_tensor() for n, c in codes.items()}

        singlora = peftc.distributed.fully_shard(adapted(1, SINGLORA))
        results["singlora"] = train(singlora, singlora.trainable_parameters(), half)
        results["singlora_t"] = counters(singlora.adapted)
        for name, model in sliced_and_experts().items():
            model = peftc.distributed.fully_shard(model.train())
            results[name] = train(model, model.trainable_parameters(), half)
        for name, model in sliced_and_experts().items():
            model = peftc.distributed.replicate(model.train())
            results[f"{name}_ddp"] = train(model, model.module.trainable_parameters(), half)
        torch.save(results, out_dir / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("distributed")
    mp.spawn(_rank, args=(f"file://{out}/rendezvous", str(out)), nprocs=WORLD, join=True)
    return out, [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]


@pytest.fixture(scope="module")
def single():
    """The single-process runs on the whole batch (2 and 1 layers), and the trained 2-layer
    model."""
    model, one, qlora = adapted(), adapted(1), adapted(1, quantize="nf4")
    singlora = adapted(1, SINGLORA)
    codes = {n: c.clone() for n, c in qlora.quantized.named_buffers() if n.endswith(".codes")}
    return {
        "2": train(model, model.trainable_parameters(), batch()),
        "1": train(one, one.trainable_parameters(), batch()),
        "qlora": train(qlora, qlora.trainable_parameters(), batch()),
        "codes": codes,
        "singlora": train(singlora, singlora.trainable_parameters(), batch()),
        **{
            name: train(m.train(), m.trainable_parameters(), batch())
            for name, m in sliced_and_experts().items()
        },
        "model": model.eval(),
    }


def _mean_over_ranks(results: list[dict], key: str) -> torch.Tensor:
    assert results[0][key] != results[1][key]  # each rank saw its own half
    return torch.tensor(
        [sum(step) / WORLD for step in zip(*(r[key] for r in results), strict=True)]
    )


@pytest.mark.parametrize("variant", ["ddp", "fsdp"])
def test_each_step_is_the_whole_batch_step(ranks, single, variant):
    expected = torch.tensor(single["2"])
    assert expected[-1] < expected[0]  # it trains
    got = _mean_over_ranks(ranks[1], variant)
    torch.testing.assert_close(got, expected, rtol=TOL, atol=0)


@pytest.mark.parametrize("variant", ["checkpointed", "compiled"])
def test_checkpointed_and_compiled_blocks_step_like_one_eager_process(ranks, single, variant):
    """Per-block activation checkpointing (eager, and with Inductor compile) under FSDP2, on a
    1-layer model so that one block compiles: the losses of one eager process on the whole
    batch; the eager block's piece runs twice a step (forward, recompute), the compiled one
    was compiled."""
    got = _mean_over_ranks(ranks[1], variant)
    torch.testing.assert_close(got, torch.tensor(single["1"]), rtol=TOL, atol=0)
    for r in ranks[1]:
        assert r["piece_runs_per_step"] == 2
        assert r["compiled_graphs"] >= 1


@pytest.mark.parametrize("variant", ["ddp", "fsdp"])
def test_the_saved_adapter_is_whole_and_loads_into_peft(ranks, single, variant):
    from peft import PeftModel  # here, not at the top: the spawned ranks need not import it

    out, _ = ranks
    assert sorted(p.name for p in (out / variant).iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    base = tiny_llama(layers=2)
    theirs = PeftModel.from_pretrained(copy.deepcopy(base), out / variant).eval()
    with torch.no_grad():
        ours = single["model"](**EVAL).logits
        assert (ours - base(**EVAL).logits).abs().max() > 1e-3
        torch.testing.assert_close(theirs(**EVAL).logits, ours, rtol=TOL, atol=TOL)


def test_sharded_eval_and_load_adapter_give_the_single_process_outputs(ranks, single):
    with torch.no_grad():
        ours = single["model"](**EVAL).logits
    for r in ranks[1]:
        torch.testing.assert_close(r["fsdp_eval"], ours, rtol=TOL, atol=TOL)
        torch.testing.assert_close(r["loaded_eval"], ours, rtol=TOL, atol=TOL)


def test_each_rank_holds_half_the_base_weights(ranks):
    for r in ranks[1]:
        local, whole = r["base_numel"]
        assert local == whole // WORLD


def test_bf16_mixed_precision_keeps_fp32_masters_and_gradients(ranks, single):
    results = ranks[1]
    got = _mean_over_ranks(results, "mixed")
    torch.testing.assert_close(got, torch.tensor(single["1"]), rtol=BF16_TOL, atol=0)
    for r in results:
        assert r["mixed_dtypes"] == ["torch.float32"]  # sharded adapters and their gradients
        assert r["mixed_logits_dtype"] == "torch.bfloat16"  # computed in bf16


def test_without_a_process_group_the_error_says_how_to_start_one():
    model = adapted(1)
    for wrap in (peftc.distributed.replicate, peftc.distributed.fully_shard):
        with pytest.raises(RuntimeError, match="init_process_group"):
            wrap(model)


def test_a_quantized_base_shards_its_codes_and_keeps_them(ranks, single):
    """QLoRA under FSDP2: the NF4 codes are sharded with their block (half on each rank),
    gathered whole they are the codes as quantized, and each step is the single-process
    quantized step on the whole batch."""
    got = _mean_over_ranks(ranks[1], "qlora")
    torch.testing.assert_close(got, torch.tensor(single["qlora"]), rtol=TOL, atol=0)
    whole = sum(c.numel() for c in single["codes"].values())
    for r in ranks[1]:
        assert r["codes_numel"] == [whole // WORLD]
        after = {n: c for n, c in r["codes_after"].items() if n.endswith(".codes")}
        assert after.keys() == single["codes"].keys()
        for name, codes in single["codes"].items():
            assert torch.equal(after[name], codes)


def test_a_step_counter_stays_whole_on_each_rank_and_counts_every_step(ranks, single):
    """SingLoRA under FSDP2: its 0-d step counters (which FSDP2 refuses to shard) stay whole
    on every rank and count each step, and the steps, the ramp included, are the single
    process's on the whole batch."""
    got = _mean_over_ranks(ranks[1], "singlora")
    torch.testing.assert_close(got, torch.tensor(single["singlora"]), rtol=TOL, atol=0)
    for r in ranks[1]:
        assert r["singlora_t"] == [STEPS]


@pytest.mark.parametrize("wrapper", ["", "_ddp"])
@pytest.mark.parametrize("variant", ["phi3", "mixtral"])
def test_slices_and_expert_weights_shard_and_step_like_one_process(ranks, single, variant, wrapper):
    """FSDP2 and DDP over adapters on rows of a packed projection (Phi-3's qkv_proj) and on
    expert weights (Mixtral's 3-D gate_up_proj and down_proj): the single process's steps."""
    expected = torch.tensor(single[variant])
    assert expected[-1] < expected[0]  # it trains
    got = _mean_over_ranks(ranks[1], variant + wrapper)
    torch.testing.assert_close(got, expected, rtol=TOL, atol=0)
