"""The seam between the training loop and how it runs: one process (CPU or one GPU) now, DeepSpeed ZeRO later.

The loop in `trainer.py` only talks to an `Engine`:

    engine.backward(loss, last_micro)   # loss already divided by grad_accum
    norm = engine.clip_grad_norm(max_norm)  # global grad norm before clipping (a float; may be nan/inf)
    engine.step()  or  engine.skip_step()   # optimizer + lr schedule  /  schedule only (non-finite step)
    engine.zero_grad()
    engine.save(dir) / engine.load(dir)     # optimizer + scheduler state (ZeRO: this rank's shards)

so a DeepSpeed engine can take over backward (loss scaling, gradient partitioning), step (its own clipping
and optimizer) and the sharded optimizer checkpoints without the loop changing. The process layout comes from
the environment (`RANK`, `LOCAL_RANK`, `WORLD_SIZE`, as torchrun and `deepspeed --no_local_rank` set them):
Hydra's command line never sees `--local_rank`.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

OPTIMIZER_FILE = "optimizer.pt"


class EngineError(RuntimeError):
    """The requested engine cannot run here; the message says what to install or change."""


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @classmethod
    def from_env(cls) -> DistEnv:
        return cls(
            rank=int(os.environ.get("RANK", 0)),
            local_rank=int(os.environ.get("LOCAL_RANK", 0)),
            world_size=int(os.environ.get("WORLD_SIZE", 1)),
        )

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(name: str, env: DistEnv) -> torch.device:
    """auto: cuda:$LOCAL_RANK when CUDA is available, else cpu."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise EngineError("trainer.device=cuda but CUDA is not available; use trainer.device=auto or cpu")
        return torch.device("cuda", env.local_rank)
    return torch.device(name)


def lr_factor(step: int, max_steps: int, warmup_steps: int, min_lr_ratio: float) -> float:
    """The lr multiplier used by optimizer step `step` (0-based): linear warmup, then cosine to min_lr_ratio."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, max_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_optimizer(param_groups: list[dict], optim_cfg) -> torch.optim.Optimizer:
    """AdamW over the policy's parameter groups (each group keeps its own lr and weight decay)."""
    return torch.optim.AdamW(
        param_groups,
        lr=optim_cfg.lr,
        betas=tuple(optim_cfg.betas),
        eps=optim_cfg.eps,
        weight_decay=optim_cfg.weight_decay,
    )


def build_scheduler(optimizer, optim_cfg, max_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, max_steps, optim_cfg.warmup_steps, optim_cfg.min_lr_ratio)
    )


class SingleProcessEngine:
    """Plain PyTorch on one device: autograd backward, `clip_grad_norm_`, AdamW + LambdaLR."""

    def __init__(self, model: torch.nn.Module, param_groups: list[dict], optim_cfg, max_steps: int, env: DistEnv):
        self.model = model
        self.env = env
        self.optimizer = build_optimizer(param_groups, optim_cfg)
        self.scheduler = build_scheduler(self.optimizer, optim_cfg, max_steps)
        self.params = [p for g in self.optimizer.param_groups for p in g["params"]]

    @property
    def is_main(self) -> bool:
        return self.env.is_main

    def backward(self, loss: torch.Tensor, last_micro: bool = True) -> None:
        loss.backward()

    def clip_grad_norm(self, max_norm: float) -> float:
        """Global L2 norm of the gradients before clipping; clips only when max_norm > 0 and the norm is finite."""
        grads = [p.grad for p in self.params if p.grad is not None]
        if not grads:
            return 0.0
        if max_norm > 0:
            norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm, error_if_nonfinite=False)
        else:
            norm = torch.nn.utils.get_total_norm(grads)
        return float(norm)

    def step(self) -> None:
        self.optimizer.step()
        self.scheduler.step()

    def skip_step(self) -> None:
        """A non-finite step: parameters and optimizer moments stay as they were; the schedule moves on."""
        self.scheduler.step()

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def lrs(self) -> dict[str, float]:
        """Current learning rate per parameter group (named by the policy group)."""
        return {g.get("name", str(i)): g["lr"] for i, g in enumerate(self.optimizer.param_groups)}

    def save(self, directory: Path) -> None:
        state = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}
        torch.save(state, Path(directory) / OPTIMIZER_FILE)

    def load(self, directory: Path) -> None:
        path = Path(directory) / OPTIMIZER_FILE
        state = torch.load(path, map_location="cpu", weights_only=True)
        names = [g.get("name") for g in self.optimizer.param_groups]
        saved = [g.get("name") for g in state["optimizer"]["param_groups"]]
        if names != saved:
            raise EngineError(f"{path}: optimizer groups {saved} do not match this run's {names} (policy changed?)")
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])

    def barrier(self) -> None:
        pass


def build_engine(dist_cfg, model, param_groups: list[dict], optim_cfg, max_steps: int, env: DistEnv):
    if dist_cfg.kind == "single":
        if env.world_size > 1:
            raise EngineError(
                f"WORLD_SIZE={env.world_size} but dist=single runs one process; use dist=zero2 or dist=zero3 "
                "for multi-process training"
            )
        return SingleProcessEngine(model, param_groups, optim_cfg, max_steps, env)
    if dist_cfg.kind in ("zero2", "zero3"):
        try:
            import deepspeed  # noqa: F401
        except ImportError:
            raise EngineError(
                f"dist={dist_cfg.kind} needs DeepSpeed, which is not installed. Install it against this torch "
                "with `pip install -e '.[deepspeed]' --no-build-isolation`, or train with dist=single."
            ) from None
        raise EngineError(
            f"dist={dist_cfg.kind}: the DeepSpeed engine is not implemented yet; train with dist=single for now"
        )
    raise EngineError(f"dist.kind={dist_cfg.kind!r}: expected single, zero2 or zero3")
