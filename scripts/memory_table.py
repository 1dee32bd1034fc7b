"""The memory table of docs/memory.md: the dry-run plan for the released models × policies × micro batch ×
recompute, per GPU for one GPU, ZeRO-2 × 8 and ZeRO-3 × 8, at 4096 tokens per sample (one 2×2-tiled image).

    python scripts/memory_table.py > table.md          # about 30 minutes on 2 CPU cores, no GPU, no weights
    python scripts/memory_table.py --models deepseek-vl2-tiny --micro-batches 1
    python scripts/memory_table.py --quantize nf4 --micro-batches 1   # the 4-bit frozen base (model.quantize)

Each cell is the predicted peak in GiB and, in brackets, the smallest of 24 / 40 / 80 GB cards it fits (— none);
extra FLOPs: the matmul and attention FLOPs recompute adds to the step's. With `--quantize`, policies that train a
quantized group in full (full_lm) are left out, and ZeRO-3 (which does not shard quantized weights) is n/a.
"""

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hydra import compose, initialize_config_dir  # noqa: E402

from deepseek_vl2_lora.plan.planner import GIB, Planner, fits, recompute_cost  # noqa: E402
from deepseek_vl2_lora.training.config import as_train_config  # noqa: E402

CONFIGS = Path(__file__).resolve().parent.parent / "deepseek_vl2_lora" / "configs"
EXPERIMENT = {"deepseek-vl2-tiny": "vl2_tiny", "deepseek-vl2-small": "vl2_small", "deepseek-vl2": "vl2"}
POLICIES = {
    "deepseek-vl2-tiny": ["mha_lora", "full_lm"],
    "deepseek-vl2-small": ["mla_lowrank", "mla_lowrank_lora", "full_lm"],
    "deepseek-vl2": ["mla_lowrank", "mla_lowrank_lora", "full_lm"],
}
CARDS = (24, 40, 80)


def cell(peak: int) -> str:
    card = next((c for c in CARDS if fits(peak, c)), None)
    return f"{peak / GIB:.1f} ({card if card else '—'})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=list(EXPERIMENT))
    ap.add_argument("--policies", nargs="+", help="only these presets (default: those that fit each model)")
    ap.add_argument("--micro-batches", nargs="+", type=int, default=[1, 4])
    ap.add_argument("--length", type=int, default=4096)
    ap.add_argument("--ranks", type=int, default=8)
    ap.add_argument("--quantize", default="none", choices=["none", "nf4", "int8"])
    args = ap.parse_args()
    zero = f"ZeRO-2 ×{args.ranks} | ZeRO-3 ×{args.ranks}"
    print(f"| model | policy | micro batch | recompute | extra FLOPs | 1 GPU | {zero} |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    t0 = time.perf_counter()
    for model in args.models:
        for policy in [p for p in POLICIES[model] if not args.policies or p in args.policies]:
            if args.quantize != "none" and policy == "full_lm":
                continue
            with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
                overrides = [f"experiment={EXPERIMENT[model]}", f"policy={policy}", f"data.max_length={args.length}"]
                cfg = as_train_config(compose("train", overrides=[*overrides, f"model.quantize={args.quantize}"]))
            planner = Planner(cfg, args.ranks)
            for mb in args.micro_batches:
                for recompute in ("none", "selective", "full"):
                    m = planner.measure(mb, recompute)
                    columns = planner.columns(m, offload=False)
                    cells = " | ".join([cell(c.peak) for c in columns] + ["n/a"] * (3 - len(columns)))
                    extra = f"{100 * recompute_cost(m, recompute)['extra_fraction']:.1f} %"
                    print(f"| {model} | {policy} | {mb} | {recompute} | {extra} | {cells} |", flush=True)
    print(f"\n({time.perf_counter() - t0:.0f} s)", file=sys.stderr)


if __name__ == "__main__":
    main()
