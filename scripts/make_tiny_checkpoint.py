#!/usr/bin/env python
"""Write tiny random DeepSeek-VL2 checkpoints in the official layout (config, safetensors, tokenizer, processor).

python scripts/make_tiny_checkpoint.py OUT_DIR [--family tiny-mha|small-mla|full-noaux|all] [--seed 0]
"""

import argparse
from pathlib import Path

from deepseek_vl2_lora.model.tiny import FAMILIES, make_tiny_checkpoint


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--family", default="all", choices=[*FAMILIES, "all"])
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    families = list(FAMILIES) if args.family == "all" else [args.family]
    for family in families:
        path = make_tiny_checkpoint(args.out_dir / family if len(families) > 1 else args.out_dir, family, args.seed)
        print(f"{family}: {path}")


if __name__ == "__main__":
    main()
