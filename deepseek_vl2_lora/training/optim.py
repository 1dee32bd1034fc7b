"""The optimizer and the lr schedule: AdamW over the policy's parameter groups (each with its own lr and weight decay;
frozen parameters never reach it), linear warmup then cosine decay to `optim.min_lr_ratio`."""

from __future__ import annotations

import math

import torch


def lr_factor(step: int, max_steps: int, warmup_steps: int, min_lr_ratio: float) -> float:
    """The lr multiplier used by optimizer step `step` (0-based): linear warmup, then cosine to min_lr_ratio."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, max_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_optimizer(param_groups: list[dict], optim_cfg, foreach: bool | None = None) -> torch.optim.Optimizer:
    """AdamW over the policy's parameter groups (each group keeps its own lr and weight decay). `foreach` None:
    PyTorch's choice (the foreach implementation for CUDA tensors)."""
    return torch.optim.AdamW(
        param_groups,
        lr=optim_cfg.lr,
        betas=tuple(optim_cfg.betas),
        eps=optim_cfg.eps,
        weight_decay=optim_cfg.weight_decay,
        foreach=foreach,
    )


def build_scheduler(optimizer, optim_cfg, max_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, max_steps, optim_cfg.warmup_steps, optim_cfg.min_lr_ratio)
    )


def group_names(optimizer) -> list[str | None]:
    return [g.get("name") for g in optimizer.param_groups]
