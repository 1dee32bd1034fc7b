"""The seam between the training loop and how it runs: one process (CPU or one GPU), or DeepSpeed ZeRO-2/3.

The loop in `loop.py` only talks to an `Engine`:

    out = engine.forward(**inputs)          # the model's forward (DeepSpeed: through its engine, for its hooks)
    engine.backward(loss, last_micro)       # loss already divided by grad_accum
    norm, applied = engine.optimizer_step(max_norm, loss_finite)
                                            # clip + AdamW + lr schedule at the end of the accumulation; a
                                            # non-finite loss or grad norm skips the update but moves the schedule
    engine.sum_over_ranks([...])            # metrics and token counts over all ranks (one process: as is)
    engine.gather_trainable()               # full fp32 trainable tensors (on rank 0) for checkpoints
    engine.save(dir) / engine.load(dir)     # optimizer + scheduler state (ZeRO: DeepSpeed's per-rank shards)

`SingleProcessEngine` is plain PyTorch. `DeepSpeedEngine` (deepspeed_engine.py) hands our AdamW (built from the
policy's parameter groups, so frozen parameters never reach it) to `deepspeed.initialize`, which shards its state
(ZeRO-2: optimizer state and gradients; ZeRO-3: the weights too, frozen ones included) and does the gradient
all-reduce/reduce-scatter, the clipping and the update; the lr schedule stays ours, on the same AdamW, so a skipped
step still moves it.

The process layout comes from the environment (dist_env.py); the optimizer and schedule from optim.py.
"""

from __future__ import annotations

import logging
import math
from contextlib import nullcontext
from pathlib import Path

import torch

from .dist_env import DistEnv, EngineError
from .optim import build_optimizer, build_scheduler, group_names

log = logging.getLogger(__name__)

OPTIMIZER_FILE = "optimizer.pt"


class SingleProcessEngine:
    """Plain PyTorch on one device: autograd backward, `clip_grad_norm_`, AdamW + LambdaLR."""

    kind = "single"

    def __init__(
        self,
        model: torch.nn.Module,
        param_groups: list[dict],
        optim_cfg,
        max_steps: int,
        env: DistEnv,
        foreach: bool | None = None,
    ):
        self.model = model
        self.env = env
        self.optimizer = build_optimizer(param_groups, optim_cfg, foreach)
        self.scheduler = build_scheduler(self.optimizer, optim_cfg, max_steps)
        self.params = [p for g in self.optimizer.param_groups for p in g["params"]]

    @property
    def is_main(self) -> bool:
        return self.env.is_main

    def forward(self, **inputs):
        return self.model(**inputs)

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

    def optimizer_step(self, max_norm: float, loss_finite: bool) -> tuple[float, bool]:
        """End of an accumulation: (grad norm before clipping, whether the update was applied)."""
        norm = self.clip_grad_norm(max_norm)
        applied = loss_finite and math.isfinite(norm)
        if applied:
            self.step()
        else:
            self.skip_step()
        self.zero_grad()
        return norm, applied

    def lrs(self) -> dict[str, float]:
        """Current learning rate per parameter group (named by the policy group)."""
        return {g.get("name", str(i)): g["lr"] for i, g in enumerate(self.optimizer.param_groups)}

    def sum_over_ranks(self, values: list[float]) -> list[float]:
        return list(values)

    def gather_from_ranks(self, values: list[float]) -> list[list[float]]:
        return [list(values)]

    def gather_trainable(self) -> tuple[dict[str, torch.Tensor], bool]:
        """(trainable tensors by parameter name, whether all are finite)."""
        tensors = {n: p.detach() for n, p in self.model.named_parameters() if p.requires_grad}
        return tensors, all(bool(torch.isfinite(t).all()) for t in tensors.values())

    def full_trainable_params(self):
        """A context in which every trainable parameter holds its full fp32 value (here it always does)."""
        return nullcontext()

    def load_trainable(self, tensors: dict[str, torch.Tensor], source: str) -> None:
        from ..policy.groups import load_trainable_state_dict

        load_trainable_state_dict(self.model, tensors, source)

    def save(self, directory: Path) -> None:
        state = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}
        torch.save(state, Path(directory) / OPTIMIZER_FILE)

    def load(self, directory: Path) -> None:
        path = Path(directory) / OPTIMIZER_FILE
        state = torch.load(path, map_location="cpu", weights_only=True)
        names = group_names(self.optimizer)
        saved = [g.get("name") for g in state["optimizer"]["param_groups"]]
        if names != saved:
            raise EngineError(f"{path}: optimizer groups {saved} do not match this run's {names} (policy changed?)")
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])

    def barrier(self) -> None:
        pass


def build_engine(
    dist_cfg,
    model,
    param_groups: list[dict],
    optim_cfg,
    max_steps: int,
    env: DistEnv,
    trainer_cfg=None,
    precision="fp32",
    micro_batch: int | None = None,
):
    if dist_cfg.kind == "single":
        if env.world_size > 1:
            raise EngineError(
                f"WORLD_SIZE={env.world_size} but dist=single runs one process; use dist=zero2 or dist=zero3 "
                "for multi-process training"
            )
        return SingleProcessEngine(model, param_groups, optim_cfg, max_steps, env)
    if dist_cfg.kind in ("zero2", "zero3"):
        device = next(model.parameters()).device if model is not None else None
        from .deepspeed_engine import DeepSpeedEngine, deepspeed_config, import_deepspeed

        import_deepspeed(dist_cfg.kind, device)
        if trainer_cfg is None:
            raise EngineError(f"dist={dist_cfg.kind}: build_engine needs the trainer config for DeepSpeed's JSON")
        ds_config = deepspeed_config(dist_cfg, trainer_cfg, optim_cfg, precision, env.world_size, micro_batch)
        return DeepSpeedEngine(model, param_groups, optim_cfg, max_steps, env, ds_config, dist_cfg.kind)
    raise EngineError(f"dist.kind={dist_cfg.kind!r}: expected single, zero2 or zero3")
