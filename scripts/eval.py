#!/usr/bin/env python
"""Evaluate a run dir, a trained-state dir or a bare checkpoint (the untrained baseline) -> eval.json.
Same as `python -m deepseek_vl2_lora.eval`; see deepseek_vl2_lora/eval.py for the full help.

    python scripts/eval.py RUN_DIR                  # RUN_DIR/eval.json
    python scripts/eval.py RUN_DIR --baseline       # RUN_DIR/eval_baseline.json
    python scripts/eval.py CHECKPOINT_DIR --out outputs/baseline/eval.json
"""

import sys

from deepseek_vl2_lora.eval import main

if __name__ == "__main__":
    sys.exit(main())
