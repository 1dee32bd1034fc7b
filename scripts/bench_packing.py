"""Benchmark token-budget batching (data.tokens_per_micro_batch, deepseek_vl2_lora/data/budget.py) against today's
micro-batch-only packing (trainer.pack_length alone), on a realistic length mix.

The mix: the demo set's samples plus a generated set whose lengths follow a long tail, Pareto(1.2) between 300 and
3,000 tokens, one image each. What is measured depends on the lengths only, so by default the generated set is a
list of lengths put through the same binning code the trainer runs (`TokenBudget`); `--make-data DIR` writes a
real data set with that length mix (the tiny checkpoint's processor: one image each, the text sized to each target
length) to train on (`python train.py data.train=...`, docs/benchmarks.md), and `--data FILE` measures a real file's
validated lengths instead of the generated list.

Reported per epoch: the packing efficiency (real tokens / the token budget of the micro batches run) and a rank's
tokens per micro batch (mean, min, max, coefficient of variation, share within 5 % of the mean). For comparison,
today's packing with the micro batch (in samples) that gives the same mean tokens per step: each micro batch's
samples packed first-fit decreasing into rows of at most `--row` tokens and padded to its longest row; its
efficiency is real tokens / computed positions (rows × longest row).

    python scripts/bench_packing.py [--records 20000] [--row 4096] [--budget 8192] [--epochs 3]
    python scripts/bench_packing.py --make-data /tmp/longtail --records 600
    python scripts/bench_packing.py --data /tmp/longtail/train.jsonl
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from deepseek_vl2_lora.data.budget import TokenBudget, token_spread  # noqa: E402
from deepseek_vl2_lora.data.packing import first_fit_decreasing  # noqa: E402
from deepseek_vl2_lora.data.sampling import epoch_order  # noqa: E402

DEMO = ROOT / "data" / "demo" / "train.jsonl"
WORDS = "the a shape colour image left right top bottom small large red blue green circle square near far".split()


def long_tailed(n: int, seed: int, low: int = 300, high: int = 3000) -> list[int]:
    """Pareto(1.2) token lengths in [low, high] (median ~530, mean ~710 tokens)."""
    rng, out = random.Random(seed), []
    while len(out) < n:
        x = low * (1 - rng.random()) ** (-1 / 1.2)
        if x <= high:
            out.append(int(x))
    return out


def processor():
    from deepseek_vl2_lora.data import DeepseekVL2Processor
    from deepseek_vl2_lora.model.tiny import ensure_tiny_checkpoint

    return DeepseekVL2Processor.from_pretrained(ensure_tiny_checkpoint("full-noaux"))


def validated_lengths(path: Path) -> list[int]:
    """A data file's sample lengths as training validates them (the tiny checkpoint's processor)."""
    from deepseek_vl2_lora.data import SFTDataset

    return SFTDataset(path, processor(), max_length=None, cache_dir=False).lengths


def make_data(out: Path, n: int, seed: int) -> Path:
    """n records with one image each (a demo picture, at one of three sizes: 1 to 2×2 tiles) and an answer whose
    length brings the sample to a target drawn from `long_tailed` (measured with the processor, no pixels read)."""
    from PIL import Image

    proc, rng = processor(), random.Random(seed)
    (out / "images").mkdir(parents=True, exist_ok=True)
    picture = Image.open(ROOT / "data" / "demo" / "images" / "train_0000.png").convert("RGB")
    sizes = [(64, 64), (128, 64), (128, 128)]
    for w, h in sizes:
        picture.resize((w, h)).save(out / "images" / f"{w}x{h}.png")
    lines = []
    for k, target in enumerate(long_tailed(n, seed)):
        w, h = sizes[k % len(sizes)]
        words = [rng.choice(WORDS) for _ in range(target)]
        lo, hi = 1, target  # the most words whose sample stays within the target
        while lo < hi:
            mid = (lo + hi + 1) // 2
            fits = proc.check(_record(words[:mid], w, h)["messages"], [(w, h)]) <= target
            lo, hi = (mid, hi) if fits else (lo, mid - 1)
        lines.append(json.dumps(_record(words[:lo], w, h)))
    path = out / "train.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def _record(words: list[str], w: int, h: int) -> dict:
    user = {"role": "user", "content": "<image>\nDescribe the picture."}
    return {"messages": [user, {"role": "assistant", "content": " ".join(words)}], "images": [f"images/{w}x{h}.png"]}


def budget_epoch(budget: TokenBudget, epoch: int) -> dict:
    s = budget.stats(epoch)
    return {"epoch": epoch, "micro_batches": s["micro_batches"], "efficiency": s["efficiency"],
            "tokens": s["tokens_per_micro_batch"]}  # fmt: skip


def micro_batch_epoch(lengths: list[int], micro: int, row: int, seed: int, epoch: int) -> dict:
    """Today's packing: micro batches of `micro` samples in the epoch order, each packed into rows on its own."""
    order = epoch_order(len(lengths), seed, epoch)
    real, computed, per_batch = 0, 0, []
    for b in range(len(order) // micro):
        batch = [lengths[i] for i in order[b * micro : (b + 1) * micro]]
        rows = first_fit_decreasing(batch, row)
        real += sum(batch)
        computed += len(rows) * max(sum(batch[i] for i in r) for r in rows)
        per_batch.append(sum(batch))
    spread = token_spread(per_batch)
    return {"epoch": epoch, "micro_batches": len(per_batch), "efficiency": real / computed, "tokens": spread}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=20000, help="generated samples (lengths, or records)")
    ap.add_argument("--row", type=int, default=4096, help="trainer.pack_length")
    ap.add_argument("--budget", type=int, default=8192, help="data.tokens_per_micro_batch")
    ap.add_argument("--ranks", type=int, default=1)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--make-data", type=Path, help="write a real data set with the generated length mix here")
    ap.add_argument("--data", type=Path, help="measure this file's validated lengths instead of a generated list")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args(argv)
    if args.make_data:
        path = make_data(args.make_data, args.records, args.seed)
        print(f"wrote {path} ({args.records} records)")
        return 0
    demo = validated_lengths(DEMO)
    generated = validated_lengths(args.data) if args.data else long_tailed(args.records, args.seed)
    lengths = demo + generated
    budget = TokenBudget(lengths, args.row, args.budget // args.row, args.ranks, args.seed)
    results = {"samples": len(lengths), "demo": len(demo), "generated": len(generated), "row": args.row,
               "budget": args.budget, "ranks": args.ranks, "window": budget.window,
               "mean_length": sum(lengths) / len(lengths), "token_budget": [], "micro_batch_packing": []}  # fmt: skip
    for e in range(args.epochs):
        results["token_budget"].append(budget_epoch(budget, e))
    mean = sum(r["tokens"]["mean"] for r in results["token_budget"]) / args.epochs
    micro = max(1, round(mean / results["mean_length"]))  # samples per micro batch for the same mean tokens
    results["micro_batch_samples"] = micro
    for e in range(args.epochs):
        results["micro_batch_packing"].append(micro_batch_epoch(lengths, micro, args.row, args.seed, e))
    print(f"{len(lengths)} samples ({len(demo)} demo + {len(generated)} generated), mean "
          f"{results['mean_length']:.0f} tokens; rows of {args.row}, {args.budget} tokens per micro batch and rank, "
          f"{args.ranks} rank(s)")  # fmt: skip
    print("| batching | epoch | micro batches | efficiency | tokens/micro batch mean | min | max | CV | within 5 % |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, key in (("token budget", "token_budget"), (f"{micro} samples, packed", "micro_batch_packing")):
        for r in results[key]:
            t = r["tokens"]
            print(f"| {name} | {r['epoch']} | {r['micro_batches']} | {r['efficiency']:.2%} | {t['mean']:.0f} | "
                  f"{t['min']} | {t['max']} | {t['cv']:.2%} | {t['within_5pct']:.1%} |")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
