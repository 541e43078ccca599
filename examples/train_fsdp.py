"""Train LoRA on a Llama sharded across processes with FSDP2 (or replicated with DDP):

    torchrun --nproc-per-node 2 examples/train_fsdp.py [--steps 20] [--bf16] [--compile]
        [--checkpointing] [--ddp] [--layers 4] [--out out/fsdp-adapter]

The model is built from a LlamaConfig (random weights, nothing is downloaded) and trained on
random tokens: the loss falls as the adapters learn the batch. Each rank trains on its own
share of every global batch; the process group is gloo on CPUs and NCCL on GPUs (one GPU per
rank, from LOCAL_RANK). Rank 0 prints the loss and every rank its share of the base weights;
the adapter is saved once, in PEFT format.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.distributed.fsdp import MixedPrecisionPolicy  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

import peftc  # noqa: E402

SPEC = {"adapters": [{"method": "lora", "targets": "all-linear", "rank": 8, "alpha": 16}]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=4, help="sequences per rank per step")
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--bf16", action="store_true", help="bf16 compute, fp32 masters and reduce")
    ap.add_argument("--compile", action="store_true", help="Inductor-compile each block")
    ap.add_argument("--checkpointing", action="store_true", help="recompute each block")
    ap.add_argument("--ddp", action="store_true", help="replicate (DDP) instead of sharding")
    ap.add_argument("--out", default="out/fsdp-adapter")
    args = ap.parse_args()

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda") if cuda else torch.device("cpu")

    torch.manual_seed(0)  # the same base weights and adapter init on every rank
    config = LlamaConfig(
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=args.layers,
        num_attention_heads=8,
        num_key_value_heads=4,
        vocab_size=2000,
        use_cache=False,
    )
    base = LlamaForCausalLM(config).to(device)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, config.vocab_size, (world * args.batch, args.seq), generator=g)
    mine = ids[rank * args.batch : (rank + 1) * args.batch].to(device)
    inputs = {"input_ids": mine, "labels": mine}
    adapted = peftc.compile(base, SPEC, inputs).train()

    if args.ddp:
        model = peftc.distributed.replicate(adapted)
        params = adapted.trainable_parameters()
    else:
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        model = peftc.distributed.fully_shard(
            adapted,
            activation_checkpointing=args.checkpointing,
            compile=args.compile,
            **({"mp_policy": mp} if args.bf16 else {}),
        )
        params = model.trainable_parameters()
        local = sum(p.to_local().numel() for p in adapted.base.parameters())
        whole = sum(p.numel() for p in adapted.base.parameters())
        print(f"rank {rank}: {local:,} of the base's {whole:,} weights ({local / whole:.2f})")

    opt = torch.optim.AdamW(params, lr=1e-3)
    for step in range(args.steps):
        loss = model(**inputs).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        mean = loss.detach().float()
        dist.all_reduce(mean)
        if rank == 0:
            print(f"step {step:3d}  loss {mean.item() / world:.4f}")
    peftc.distributed.save_adapter(model, args.out)
    if rank == 0:
        print(f"adapter saved to {args.out} (PEFT format)")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
