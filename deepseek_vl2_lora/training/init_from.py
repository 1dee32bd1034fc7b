"""`model.init_from`: a new run that starts from trained state (a second stage, or continued fine-tuning).

`model.init_from` names a trained dir, its run dir, or a stock PEFT LoRA adapter for this architecture. The run
trains on `model.path` (the base) with the adapter's policy, which replaces the configured `policy` (written so in
config_resolved.yaml; a stock adapter's policy is derived from its targets, `policy/foreign.py`), and starts from the
adapter's values: LoRA factors and the fully trained tensors, as fp32 master weights. Optimizer, lr schedule, data
position and step count start fresh: this is not `trainer.resume`, which continues a run from its own checkpoint.

With both set, a checkpoint of this run wins (`trainer.resume=auto` in a requeued job that was started with
`model.init_from`): the checkpoint holds every trainable tensor. It must come from a run started from the same
`model.init_from` (recorded in its state), so that the policy is the same.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from omegaconf import OmegaConf

from ..model.config import VL2Config
from ..policy.adapters import load_trained_tensors, resolve_trained_dir, trained_base, trained_policy
from ..policy.groups import to_policy_config
from .config import ConfigError
from .preflight import resolve_model_dir
from .train_state import STATE_FILE, ResumeError, is_step_checkpoint

log = logging.getLogger(__name__)


def init_from_dir(model_cfg) -> Path | None:
    """The trained dir `model.init_from` names (resolved, absolute), None when unset; a one-line error if it is no
    trained dir, run dir or PEFT adapter."""
    if not model_cfg.get("init_from"):
        return None
    path = Path(model_cfg.init_from).expanduser()
    if is_step_checkpoint(path):
        raise ConfigError(
            f"model.init_from={model_cfg.init_from}: a step checkpoint; export it first "
            f"(vl2-export {path} OUT, or python -m deepseek_vl2_lora.export) and pass model.init_from=OUT"
        )
    try:
        return resolve_trained_dir(path).resolve()
    except FileNotFoundError as e:
        raise ConfigError(f"model.init_from={model_cfg.init_from}: {e}") from None


def apply_init_from(cfg) -> Path | None:
    """Set `cfg.policy` to the policy of the trained state `model.init_from` names; returns its dir (None: unset).
    Before the model loads: a stock adapter's targets are matched on the model built on the meta device."""
    trained = init_from_dir(cfg.model)
    if trained is None:
        return None
    model_dir = resolve_model_dir(cfg.model)  # (a tiny one: generated here)
    config = VL2Config.from_file(model_dir / "config.json")
    policy = to_policy_config(trained_policy(trained, config))
    configured = OmegaConf.to_container(cfg.policy, resolve=True)
    cfg.policy = OmegaConf.structured(policy)
    if OmegaConf.to_container(cfg.policy, resolve=True) != configured:
        log.info("model.init_from=%s: training with its policy %s (in place of policy=%s)", trained, policy.name,
                 configured.get("name"))  # fmt: skip
    base, name = trained_base(trained)
    if base is not None and base.resolve() != model_dir.resolve():
        log.warning("model.init_from=%s was trained on %s; this run's base is %s", trained, name, model_dir)
    return trained


def load_init_from(model: torch.nn.Module, trained: Path) -> None:
    """The adapter's LoRA factors and trained tensors into the model's trainable parameters (the policy applied)."""
    load_trained_tensors(model, trained)
    log.info("model.init_from: started from %s", trained)


def check_same_start(checkpoint: Path, init_from: Path | None) -> None:
    """A checkpoint resumes only a run with the same `model.init_from` (its state records it): one line if not."""
    try:
        recorded = json.loads((Path(checkpoint) / STATE_FILE).read_text()).get("extra", {}).get("init_from")
    except (OSError, ValueError, AttributeError):
        return  # an unreadable state.json is reported by the load itself
    current = str(init_from) if init_from is not None else None
    if recorded != current:
        raise ResumeError(
            f"{checkpoint}: its run started from model.init_from={recorded}; this run's is {current}. Resume with "
            "the same model.init_from."
        )
