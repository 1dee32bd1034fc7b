#!/usr/bin/env python
"""Merge trained state into its base checkpoint: the `vl2-merge` console command (deepseek_vl2_lora/cli.py; `--help`).

python scripts/merge.py [BASE_CHECKPOINT_DIR] TRAINED_STATE_DIR|RUN_DIR OUT_DIR [--dtype ...] [--max-shard-size 5GB]
"""

import sys

from deepseek_vl2_lora.cli import merge

if __name__ == "__main__":
    sys.exit(merge())
