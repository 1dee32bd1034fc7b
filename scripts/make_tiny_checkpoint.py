#!/usr/bin/env python
"""Write random DeepSeek-VL2 checkpoints in the official layout (config, safetensors, tokenizer, processor).

python scripts/make_tiny_checkpoint.py OUT_DIR [--family tiny-mha|small-mla|full-noaux|all] [--seed 0]
python scripts/make_tiny_checkpoint.py OUT_DIR --released deepseek-vl2-tiny [--layers N] [--vision-layers N]

The first form writes the tiny test families; the second a released model at full width (the shipped config.json
and processor_config.json, optionally fewer layers) with random bf16 weights in shards, for runs of the real
shapes (docs/benchmarks.md) where the real weights cannot be downloaded.
"""

import argparse
from pathlib import Path

from deepseek_vl2_lora.model.tiny import FAMILIES, make_released_random_checkpoint, make_tiny_checkpoint
from deepseek_vl2_lora.plan.planner import RELEASED


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--family", default="all", choices=[*FAMILIES, "all"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--released", choices=RELEASED, help="a released model at full size instead of the families")
    ap.add_argument("--layers", type=int, help="--released: LM layers (default: the released depth)")
    ap.add_argument("--vision-layers", type=int, help="--released: vision tower layers (default: released)")
    args = ap.parse_args()
    if args.released:
        path = make_released_random_checkpoint(args.out_dir, args.released, args.layers, args.vision_layers, args.seed)
        print(f"{args.released}: {path}")
        return
    families = list(FAMILIES) if args.family == "all" else [args.family]
    for family in families:
        path = make_tiny_checkpoint(args.out_dir / family if len(families) > 1 else args.out_dir, family, args.seed)
        print(f"{family}: {path}")


if __name__ == "__main__":
    main()
