"""The pieces of one training step that the training loop (loop.py) and the dry-run memory plan (plan/) share,
so the plan measures the code that trains: the model prepared as training prepares it, and one micro batch's
forward and backward."""

from __future__ import annotations

from contextlib import nullcontext
from functools import partial

import torch

from ..evaluation.eval_set import MODEL_INPUTS
from ..policy.groups import apply_policy
from ..policy.report import PolicyReport


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision == "auto":
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    return precision


def resolve_dtype(dtype: str, precision: str, device: torch.device) -> torch.dtype:
    """Storage dtype of the loaded weights; bf16 weights need bf16 autocast around them."""
    if dtype == "auto":
        return torch.bfloat16 if precision == "bf16" and device.type == "cuda" else torch.float32
    if dtype == "bfloat16" and precision != "bf16":
        from .config import ConfigError

        raise ConfigError(f"model.dtype=bfloat16 needs bf16 autocast, but training runs in {precision} on {device}")
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]


def autocast_for(precision: str, device: torch.device):
    """A context-manager factory: bf16 autocast on `device` for bf16 runs, nothing otherwise."""
    return partial(torch.autocast, device.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext


def prepare_model(model: torch.nn.Module, policy_cfg, trainer_cfg, compile_layers: bool | None = None) -> PolicyReport:
    """The model as training runs it: the freezing policy applied (PEFT adapters included), trainable weights in
    fp32 (master weights under bf16 storage), recompute (`trainer.recompute`) and `torch.compile` per layer as
    `trainer_cfg` says (`compile_layers` overrides the latter), train mode. Returns the policy report."""
    report = apply_policy(model, policy_cfg)
    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
    from .config import resolve_recompute  # (config imports Hydra; the step's users need not)

    model.language.model.recompute = resolve_recompute(trainer_cfg)
    if trainer_cfg.compile_blocks if compile_layers is None else compile_layers:
        model.language.model.compile_layers()
    model.train()
    return report


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items() if isinstance(v, torch.Tensor)}


def micro_step(
    engine,
    batch: dict,
    device: torch.device,
    autocast,
    loss_weight: float = 1.0,
    grad_accum: int = 1,
    last_micro: bool = True,
    poison: bool = False,
    full_logits: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward and backward of one collated micro batch; returns (weighted LM loss, aux loss), detached.

    The objective is (LM loss × `loss_weight` + MoE aux loss) / `grad_accum`; `loss_weight` is this rank's share
    of the global micro batch's supervised tokens (1.0 in one process). `poison` makes the LM loss NaN (fault
    injection in tests). `full_logits`: the loss from full-vocabulary fp32 logits instead (the benchmark's
    official-style reference path; training never asks for it)."""
    tile_keys = batch.get("tile_keys")  # strings: stay on the host
    batch = to_device(batch, device)
    with autocast():
        # return_logits=False: lm_head and CE on supervised positions only, no full fp32 logits
        inputs = {k: batch[k] for k in MODEL_INPUTS + ("segment_ids",) if k in batch}
        if tile_keys is not None:
            inputs["tile_keys"] = tile_keys
        out = engine.forward(**inputs, labels=batch["labels"], return_logits=full_logits)
    loss = out.loss * float("nan") if poison else out.loss
    aux = out.aux_loss if out.aux_loss is not None else torch.zeros((), device=device)
    engine.backward((loss * loss_weight + aux) / grad_accum, last_micro=last_micro)
    return loss.detach().float() * loss_weight, aux.detach().float()
