#!/usr/bin/env python
"""Merge trained state (the PEFT adapter in RUN_DIR/trained) into its base checkpoint, writing the official layout.

python scripts/merge.py [BASE_CHECKPOINT_DIR] TRAINED_STATE_DIR|RUN_DIR OUT_DIR [--dtype bfloat16|float32]

Without BASE_CHECKPOINT_DIR the base is the adapter's base_model_name_or_path (the checkpoint training loaded).
"""

import argparse
import logging
import sys

import torch

from deepseek_vl2_lora.policy.merge import merge_checkpoint


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("paths", nargs="+", metavar="[BASE] TRAINED OUT")
    ap.add_argument(
        "--dtype",
        choices=["bfloat16", "float16", "float32"],
        default=None,
        help="dtype of the written weights (default: the base checkpoint's)",
    )
    args = ap.parse_args()
    if len(args.paths) not in (2, 3):
        ap.error("expected [BASE] TRAINED OUT")
    base, trained, out = [None, *args.paths][-3:]
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # says which base weights the merge uses
    try:
        print(merge_checkpoint(base, trained, out, getattr(torch, args.dtype) if args.dtype else None))
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
