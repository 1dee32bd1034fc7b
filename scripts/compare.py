#!/usr/bin/env python
"""Compare runs: a markdown table (policy, trainable params, train/eval loss, eval accuracy, tokens/s, peak memory,
wall time) and a PNG of loss curves. The logic and the full help are in deepseek_vl2_lora/compare/report.py.

    python scripts/compare.py multirun/policies                 # a sweep dir -> multirun/policies/compare/
    python scripts/compare.py RUN_DIR... [BASELINE_EVAL_DIR] --out reports/policies
    python scripts/compare.py --wandb ENTITY/PROJECT --wandb-group default-policies
"""

import sys

from deepseek_vl2_lora.compare import main

if __name__ == "__main__":
    sys.exit(main())
