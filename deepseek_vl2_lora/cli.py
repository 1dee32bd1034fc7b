"""The console commands an install provides (pyproject `[project.scripts]`), beside the `python -m` and script forms:

    vl2-train  [key=value ...]                   python train.py                  (Hydra; configs in the package)
    vl2-eval   RUN_DIR|TRAINED|CHECKPOINT        python -m deepseek_vl2_lora.eval
    vl2-merge  [BASE] TRAINED OUT                python scripts/merge.py
    vl2-chat   MODEL                             python scripts/chat.py
    vl2-export CHECKPOINT_DIR OUT                python -m deepseek_vl2_lora.export
    vl2-data   check FILE...                     python -m deepseek_vl2_lora.data

Each is a thin function over its room (training, policy.merge, evaluation.chat, ...); user mistakes end in one
line on stderr, not a traceback.
"""

from __future__ import annotations

import argparse
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from . import CONFIG_DIR
from .training.config import register_configs

register_configs()


# A directory path, not `pkg://deepseek_vl2_lora/configs` (Hydra needs a Python package for that).
@hydra.main(config_path=str(CONFIG_DIR), config_name="train", version_base="1.3")
def train(cfg: DictConfig) -> float | None:
    """`vl2-train` / `python train.py`: train, or plan GPU memory with trainer.dry_run=true (train.py's doc)."""
    try:  # here, so --help and --cfg need no torch
        from .training import USER_ERRORS
        from .training import train as run_training
        from .training.preemption import PREEMPTED_EXIT, Interrupted
    except KeyboardInterrupt:  # Ctrl-C while importing, before train() installs its handlers
        sys.exit("interrupted")
    try:
        if cfg.trainer.dry_run:  # plan GPU memory on fake tensors instead of training (deepseek_vl2_lora/plan)
            from .plan.planner import dry_run

            dry_run(cfg, HydraConfig.get().runtime.output_dir)
            return None
        result = run_training(cfg, HydraConfig.get().runtime.output_dir)
    except Interrupted as e:  # a signal during setup: nothing was trained, nothing to save
        print(f"stopped: {e}", file=sys.stderr)
        sys.exit(PREEMPTED_EXIT)
    except USER_ERRORS as e:  # the message says what to change: no traceback
        sys.exit(f"error: {e}")
    if result.preempted:  # stopped by a signal after a checkpoint: a scheduler should run it again
        sys.exit(PREEMPTED_EXIT)
    return (result.eval_after or {}).get("eval/accuracy")  # a sweeper's objective


MERGE_DOC = """Merge trained state into its base checkpoint: a full checkpoint in the official layout, written one base
shard at a time (memory: about the largest base shard plus the trained state), in Hub-sized shards.

    vl2-merge [BASE_CHECKPOINT_DIR] TRAINED OUT [--dtype bfloat16|float16|float32] [--max-shard-size 5GB]

TRAINED is a trained-state dir, its run dir or a stock PEFT LoRA adapter (export a step checkpoint first:
vl2-export). Without BASE_CHECKPOINT_DIR the base is the local checkpoint training read (base_model.json), or the
adapter's base_model_name_or_path when that is a local directory.
"""


def merge(argv: list[str] | None = None) -> int:
    """`vl2-merge` / `python scripts/merge.py`."""
    ap = argparse.ArgumentParser(prog="vl2-merge", description=MERGE_DOC, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("paths", nargs="+", metavar="[BASE] TRAINED OUT")
    ap.add_argument(
        "--dtype",
        choices=["bfloat16", "float16", "float32"],
        default=None,
        help="dtype of the written weights (default: the base checkpoint's)",
    )
    ap.add_argument(
        "--max-shard-size",
        default="5GB",
        help="largest file of the merged checkpoint, HF-style: 5GB (the default, the Hub's), 500MB, 2GiB",
    )
    args = ap.parse_args(argv)
    if len(args.paths) not in (2, 3):
        ap.error("expected [BASE] TRAINED OUT")
    base, trained, out = [None, *args.paths][-3:]

    import logging

    import torch

    from .policy.merge import merge_checkpoint

    logging.basicConfig(level=logging.INFO, format="%(message)s")  # says which base weights the merge uses

    try:
        dtype = getattr(torch, args.dtype) if args.dtype else None
        print(merge_checkpoint(base, trained, out, dtype, args.max_shard_size))
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    return 0


def chat(argv: list[str] | None = None) -> int:
    """`vl2-chat` / `python scripts/chat.py` (deepseek_vl2_lora/evaluation/chat.py)."""
    from .evaluation.chat import main

    return main(argv)
