"""Fine-tune DeepSeek-VL2 (the same as the `vl2-train` console command). The config tree is deepseek_vl2_lora/configs/
(Hydra); the command is deepseek_vl2_lora/cli.py's `train`, the loop deepseek_vl2_lora/training/loop.py.

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

from deepseek_vl2_lora.cli import train  # also the `vl2-train` console command

if __name__ == "__main__":
    train()
