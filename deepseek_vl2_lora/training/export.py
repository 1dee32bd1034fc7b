"""A step checkpoint (`<run dir>/checkpoints/step_XXXXXXXX`) as a trained dir: what `trained/` would hold had the run
ended at that step (a stock PEFT adapter + policy.json + base_model.json), for eval, chat, merge, `model.init_from`
or `peft.PeftModel.from_pretrained`.

No weights are read: the model is built on the meta device from the base's config.json, the run's policy is applied
(from its config_resolved.yaml), the checkpoint's trainable tensors (fp32, by the training loop's parameter names)
take the trainable parameters' places, and `save_trained_state` writes the directory as the run's end does.
"""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from ..model.config import VL2Config
from ..model.deepseek_vl2 import DeepseekVL2ForCausalLM
from ..policy.adapters import RUN_CONFIG_FILE, save_trained_state
from ..policy.groups import apply_policy, load_trainable_state_dict
from .config import ConfigError, as_train_config
from .preflight import resolve_model_dir
from .train_state import (
    CHECKPOINTS,
    STATE_FILE,
    TRAINABLE_FILE,
    ResumeError,
    find_resume_checkpoint,
    is_step_checkpoint,
    newest_intact_checkpoint,
)


def export_checkpoint(checkpoint: str | Path, out: str | Path) -> Path:
    """Write the trained dir of `checkpoint` (a step checkpoint, which must be intact, or a run dir: its newest
    intact one) to `out`; one-line errors for what is not one."""
    path = Path(checkpoint).expanduser()
    if not is_step_checkpoint(path) and not (path / RUN_CONFIG_FILE).is_file():
        raise ResumeError(f"{path}: not a step checkpoint ({STATE_FILE}, {TRAINABLE_FILE}) or a run directory")
    if is_step_checkpoint(path):
        found = find_resume_checkpoint(str(path), path)  # verifies its manifest
    else:
        found = newest_intact_checkpoint(path)
        if found is None:
            raise ResumeError(f"{path}: a run directory without an intact checkpoint under {CHECKPOINTS}/")
    run_dir = found.parent.parent
    if not (run_dir / RUN_CONFIG_FILE).is_file():
        raise ConfigError(f"{found}: its run directory {run_dir} has no {RUN_CONFIG_FILE} (the run's policy and base)")
    cfg = as_train_config(OmegaConf.load(run_dir / RUN_CONFIG_FILE))
    base = resolve_model_dir(cfg.model)
    with torch.device("meta"):
        model = DeepseekVL2ForCausalLM(VL2Config.from_file(base / "config.json"))
    apply_policy(model, cfg.policy)  # the run's effective policy (model.init_from's, when it had one)
    load_trainable_state_dict(model, load_file(str(found / TRAINABLE_FILE)), str(found / TRAINABLE_FILE), assign=True)
    return save_trained_state(model, out, base_model=base, hub_id=cfg.model.hub_id)
