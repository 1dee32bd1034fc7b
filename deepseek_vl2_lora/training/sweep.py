"""Sweep metadata: the W&B group, tags and run name of a run, derived from the Hydra sweep it belongs to.

So that the runs of one sweep line up in the W&B UI (grouped together, filterable by what changed):

    python train.py -m policy=mla_lowrank,lora_o_mlp seed=0,1 logger=wandb hydra.sweep.dir=multirun/policies

gives every job
    group  <experiment name>-<sweep dir name>        default-policies  (one group per sweep)
    name   the job's values of the swept keys        policy=lora_o_mlp,seed=1
    tags   the experiment's `tags` + every override  policy=lora_o_mlp, seed=1 (+ any fixed override)

A run is in a sweep when Hydra runs it in multirun mode (`-m`; the swept keys are the overrides with several
values in the sweep's multirun.yaml), or when the environment variable DEEPSEEK_VL2_LORA_SWEEP_DIR names a sweep
directory: scripts/sweep_multi_gpu.sh sets it, DEEPSEEK_VL2_LORA_SWEEP_JOB (the run's index) and
DEEPSEEK_VL2_LORA_SWEEP_RUN (the run's own overrides, whose keys are the swept ones) for its one-by-one DeepSpeed
runs, which Hydra sees as single runs. Without swept keys the name is all of the job's overrides.
Outside a sweep: group = the experiment name, name = <experiment name>-<run dir name>, tags = the experiment's
`tags` + the overrides. An explicit `logger.group` or `logger.run_name` wins. Overrides that do not change the
experiment (logger.*, hydra.*, trainer.resume, trainer.progress_bar, trainer.print_every) are left out of the
name and the tags.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

SWEEP_DIR_ENV = "DEEPSEEK_VL2_LORA_SWEEP_DIR"
SWEEP_JOB_ENV = "DEEPSEEK_VL2_LORA_SWEEP_JOB"
SWEEP_RUN_ENV = "DEEPSEEK_VL2_LORA_SWEEP_RUN"
# Override keys (or key prefixes ending in ".") that say how a run is run, not what it is.
IGNORED_KEYS = ("logger", "logger.", "hydra.", "trainer.resume", "trainer.progress_bar", "trainer.print_every")
MAX_TAG = 64  # W&B's limit on a tag's length
MAX_GROUP = 128  # W&B's limit on a group's length


@dataclass
class SweepContext:
    """Where a run sits: its command-line overrides and, in a sweep, the sweep directory and job number."""

    overrides: list[str] = field(default_factory=list)  # Hydra task overrides, e.g. ["policy=lora_o_mlp"]
    sweep_dir: str | None = None
    job_num: int | None = None
    swept: list[str] | None = None  # the keys the sweep varies (None: unknown)


@dataclass
class WandbNames:
    group: str
    name: str
    tags: list[str]


def hydra_context() -> SweepContext:
    """The running Hydra job's overrides and sweep (empty outside Hydra, e.g. `train(cfg, run_dir)` called directly)."""
    job = os.environ.get(SWEEP_JOB_ENV, "")
    ctx = SweepContext(sweep_dir=os.environ.get(SWEEP_DIR_ENV) or None, job_num=int(job) if job.isdigit() else None)
    if ctx.sweep_dir and os.environ.get(SWEEP_RUN_ENV):
        ctx.swept = [_key(o) for o in os.environ[SWEEP_RUN_ENV].split() if "=" in o]
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hc = HydraConfig.get()
    except (ImportError, ValueError):  # ValueError: HydraConfig was not set (not inside @hydra.main)
        return ctx
    ctx.overrides = list(hc.overrides.task)
    if hc.mode == RunMode.MULTIRUN:  # hydra.sweep.dir and hydra.job.num only resolve in multirun mode
        ctx.sweep_dir = str(hc.sweep.dir)
        ctx.job_num = int(hc.job.num)
        ctx.swept = swept_keys(Path(ctx.sweep_dir) / "multirun.yaml")
    return ctx


def swept_keys(multirun_yaml: Path) -> list[str] | None:
    """The keys a Hydra multirun sweeps over (`key=a,b`, `key=range(..)`, ...), from its multirun.yaml."""
    try:
        from hydra.core.override_parser.overrides_parser import OverridesParser
        from omegaconf import OmegaConf

        task = OmegaConf.select(OmegaConf.load(multirun_yaml), "hydra.overrides.task") or []
        parsed = OverridesParser.create().parse_overrides([str(o) for o in task])
    except Exception:  # no file, or a format this Hydra does not parse: fall back to all overrides
        return None
    return [o.key_or_group for o in parsed if o.is_sweep_override()] or None


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def relevant_overrides(overrides: list[str]) -> list[str]:
    """The overrides that define the experiment, as key=value (a leading + or ++ dropped), in the given order."""
    out = []
    for o in overrides:
        key = _key(o)
        if any(key == k or (k.endswith(".") and key.startswith(k)) for k in IGNORED_KEYS):
            continue
        out.append(o.lstrip("+") if "=" in o else o)
    return out


def _tag(text: str) -> str:
    return text if len(text) <= MAX_TAG else text[: MAX_TAG - 1] + "…"


def wandb_names(
    name: str,
    tags: list[str],
    run_dir: str | Path,
    ctx: SweepContext,
    group: str | None = None,
    run_name: str | None = None,
) -> WandbNames:
    """W&B group, run name and tags for a run of experiment `name` in `run_dir` (see the module docstring).

    `group` / `run_name` are `logger.group` / `logger.run_name`: when set, they are used as they are."""
    overrides = relevant_overrides(ctx.overrides)
    in_sweep = ctx.sweep_dir is not None
    if group is None:
        group = f"{name}-{Path(ctx.sweep_dir).name}" if in_sweep else name
    if run_name is None:
        swept = [o for o in overrides if _key(o) in (ctx.swept or ())]
        if in_sweep and (swept or overrides):
            run_name = ",".join(swept or overrides)
        else:
            run_name = f"{name}-{Path(run_dir).name}"
    all_tags = []
    for t in [*tags, *overrides]:
        t = _tag(str(t))
        if t not in all_tags:
            all_tags.append(t)
    return WandbNames(group=group[:MAX_GROUP], name=run_name, tags=all_tags)
