"""Fine-tune DeepSeek-VL2. The config tree is deepseek_vl2_lora/configs/ (Hydra); the loop is
deepseek_vl2_lora/training/loop.py.

    python train.py                                  # the demo: tiny random model, bundled data, ~20 s on CPU
    python train.py experiment=smoke                 # a few seconds end to end
    python train.py experiment=vl2_small model.path=/path/to/deepseek-vl2-small data.train_path=...
    python train.py trainer.max_steps=50 optim.lr=1e-3 policy=mla_lowrank_lora logger=wandb
    python train.py hydra.run.dir=outputs/default/<time> trainer.resume=auto   # continue a killed run

SIGTERM, SIGUSR1 or Ctrl-C: the run finishes its optimizer step, writes a checkpoint and exits with status 75
(deepseek_vl2_lora/training/preemption.py); a second signal ends it at once.
    python train.py -m optim.lr=1e-3,3e-3,1e-2      # a sweep, one run dir each under multirun/

Multi-GPU (DeepSpeed ZeRO): scripts/launch_*.sh, which pass `--no_local_rank` and one `hydra.run.dir` to all ranks.
"""

import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from deepseek_vl2_lora.training.config import register_configs

register_configs()


@hydra.main(config_path="deepseek_vl2_lora/configs", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    try:  # here, so --help and --cfg need no torch
        from deepseek_vl2_lora.training import USER_ERRORS, train
        from deepseek_vl2_lora.training.preemption import PREEMPTED_EXIT, Interrupted
    except KeyboardInterrupt:  # Ctrl-C while importing, before train() installs its handlers
        sys.exit("interrupted")
    try:
        if cfg.trainer.dry_run:  # plan GPU memory on fake tensors instead of training (deepseek_vl2_lora/plan)
            from deepseek_vl2_lora.plan.planner import dry_run

            dry_run(cfg, HydraConfig.get().runtime.output_dir)
            return None
        result = train(cfg, HydraConfig.get().runtime.output_dir)
    except Interrupted as e:  # a signal during setup: nothing was trained, nothing to save
        print(f"stopped: {e}", file=sys.stderr)
        sys.exit(PREEMPTED_EXIT)
    except USER_ERRORS as e:  # the message says what to change: no traceback
        sys.exit(f"error: {e}")
    if result.preempted:  # stopped by a signal after a checkpoint: a scheduler should run it again
        sys.exit(PREEMPTED_EXIT)
    return (result.eval_after or {}).get("eval/accuracy")  # a sweeper's objective


if __name__ == "__main__":
    main()
