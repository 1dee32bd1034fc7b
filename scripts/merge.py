#!/usr/bin/env python
"""Merge trained state (LoRA adapter + trained tensors) into a base checkpoint, writing the official layout.

python scripts/merge.py BASE_CHECKPOINT_DIR TRAINED_STATE_DIR OUT_DIR [--dtype bfloat16|float32]
"""

import argparse

import torch

from deepseek_vl2_lora.merge import merge_checkpoint


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("base")
    ap.add_argument("trained")
    ap.add_argument("out")
    ap.add_argument(
        "--dtype",
        choices=["bfloat16", "float16", "float32"],
        default=None,
        help="dtype of the written weights (default: the base checkpoint's)",
    )
    args = ap.parse_args()
    print(merge_checkpoint(args.base, args.trained, args.out, getattr(torch, args.dtype) if args.dtype else None))


if __name__ == "__main__":
    main()
