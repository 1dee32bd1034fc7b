"""Training metrics: `metrics.jsonl`, Weights & Biases, the FLOP rule behind MFU, peak memory.

FLOP rule (model FLOPs, counted from the batch; padding is not counted, recomputation by gradient
checkpointing is not counted):

  language model, per real token (text and image positions alike):
      2·N_active            forward matmuls
    + 2·N_active            backward, gradient w.r.t. the inputs (it flows through every layer)
    + 2·N_trainable_active  backward, gradient w.r.t. trainable weights
    = 4·N_active + 2·N_trainable_active, plus 3 × the forward attention FLOPs (attention has no weights: its
      backward is two input-gradient products per forward product).
  N_active counts the matrices a token goes through: every ≥2-D LM parameter except the embedding table
  (a lookup), with routed experts scaled by top_k / n_routed_experts; lm_head included; LoRA adapters
  included. Forward attention per layer = 2·heads·(d_qk + d_v) per (query, key) pair; causal, so a sequence
  of L real tokens has L(L+1)/2 pairs.
  vision tower, per tile (P = patches per tile, N_vision without the position table): 2·N_vision·P +
  attention 2·2·width·P² per layer, forward only when the tower is frozen (it runs without autograd); when any
  vision parameter trains, the LM rule applies (4N + 2N_trainable + 3·attention). Projector: 2·N_projector
  per projected token forward, plus 2·N_projector_trainable when it trains (plus 2·N_projector when the tower
  trains too).

MFU = model FLOPs per second / the device's dense peak (bf16 under bf16 autocast, else TF32 or FP32), taken
from `PEAK_FLOPS` below by device name; None on CPU and on unknown devices (set `trainer.peak_flops`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import resource
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from ..model.quant import quantized_weights

log = logging.getLogger(__name__)

# Dense (no sparsity) peak FLOP/s by device-name substring, first match wins (so PCIe/NVL before the SXM name).
# Sources: NVIDIA datasheets. fp32 = plain FP32 (no tensor cores), tf32 = TF32 tensor cores.
PEAK_FLOPS: list[tuple[str, dict[str, float]]] = [
    ("H100 PCIe", {"bf16": 756e12, "tf32": 378e12, "fp32": 51.2e12}),
    ("H100 NVL", {"bf16": 835e12, "tf32": 417.5e12, "fp32": 60e12}),
    ("H100", {"bf16": 989.4e12, "tf32": 494.7e12, "fp32": 66.9e12}),
    ("H200", {"bf16": 989.4e12, "tf32": 494.7e12, "fp32": 66.9e12}),
    ("A100", {"bf16": 312e12, "tf32": 156e12, "fp32": 19.5e12}),
    ("L40S", {"bf16": 362.05e12, "tf32": 183e12, "fp32": 91.6e12}),
    ("RTX 4090", {"bf16": 165.2e12, "tf32": 82.6e12, "fp32": 82.6e12}),
]


def peak_flops(device: torch.device, precision: str) -> float | None:
    """The table's dense peak for this device and compute precision ('bf16' or 'fp32'); None on CPU/unknown."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peaks in PEAK_FLOPS:
        if key in name:
            if precision == "bf16":
                return peaks["bf16"]
            return peaks["tf32"] if torch.backends.cuda.matmul.allow_tf32 else peaks["fp32"]
    return None


@dataclass
class FlopModel:
    """Parameter counts the FLOP rule needs, read once from the model after the policy is applied."""

    lm_active: float  # N_active (routed experts scaled by top_k / n_routed)
    lm_trainable_active: float
    lm_layers: int
    lm_heads: int
    d_qk: int
    d_v: int
    vision: int
    vision_trainable: int
    vision_layers: int
    vision_width: int
    patches_per_tile: int
    projector: int
    projector_trainable: int
    projected_per_tile: int

    @classmethod
    def from_model(cls, model) -> FlopModel:
        cfg = model.config
        lm = cfg.language
        expert_share = (lm.num_experts_per_tok or 0) / lm.n_routed_experts if lm.n_routed_experts else 0.0
        lm_active = lm_trainable = 0.0
        weights = [(n, p.dim(), p.numel(), p.requires_grad) for n, p in model.language.named_parameters()]
        weights += [(n, len(q.shape), q.numel(), False) for n, q in quantized_weights(model.language).items()]
        for name, dim, numel, trainable in weights:
            if dim < 2 or "embed_tokens" in name:
                continue
            share = expert_share if ".mlp.experts." in name else 1.0
            lm_active += numel * share
            if trainable:
                lm_trainable += numel * share
        if lm.use_mla:
            d_qk, d_v = lm.qk_nope_head_dim + lm.qk_rope_head_dim, lm.v_head_dim
        else:
            d_qk = d_v = lm.hidden_size // lm.num_attention_heads
        grid = cfg.vision.image_size // cfg.vision.patch_size
        side = math.ceil(grid / cfg.projector.downsample_ratio)

        def count(module, trainable_only=False):  # matmul weights only: not the position-embedding table
            return sum(
                p.numel()
                for n, p in module.named_parameters()
                if p.dim() >= 2 and "pos_embed" not in n and (p.requires_grad or not trainable_only)
            )

        return cls(
            lm_active=lm_active,
            lm_trainable_active=lm_trainable,
            lm_layers=lm.num_hidden_layers,
            lm_heads=lm.num_attention_heads,
            d_qk=d_qk,
            d_v=d_v,
            vision=count(model.vision),
            vision_trainable=count(model.vision, True),
            vision_layers=cfg.vision.layers,
            vision_width=cfg.vision.width,
            patches_per_tile=grid * grid,
            projector=count(model.projector),
            projector_trainable=count(model.projector, True),
            projected_per_tile=side * side,
        )

    def lm_flops(self, seq_lens: list[int]) -> float:
        tokens = sum(seq_lens)
        pairs = sum(n * (n + 1) // 2 for n in seq_lens)
        attn_fwd = self.lm_layers * pairs * 2 * self.lm_heads * (self.d_qk + self.d_v)
        return (4 * self.lm_active + 2 * self.lm_trainable_active) * tokens + 3 * attn_fwd

    def vision_flops(self, n_tiles: int) -> float:
        p = self.patches_per_tile
        dense = 2 * self.vision * p
        attn = self.vision_layers * 2 * 2 * self.vision_width * p * p
        if self.vision_trainable:
            vision = 2 * dense + 2 * self.vision_trainable * p + 3 * attn
        else:
            vision = dense + attn
        q = self.projected_per_tile
        projector = 2 * self.projector * q + 2 * self.projector_trainable * q
        if self.vision_trainable:
            projector += 2 * self.projector * q
        return n_tiles * (vision + projector)

    def batch_flops(self, batch: dict, seq_lens: list[int] | None = None) -> float:
        """Model FLOPs of one forward+backward over `batch` (a collated training batch, on any device).
        `seq_lens`: its samples' lengths (`packing.sample_lengths`) when the caller has them already."""
        if seq_lens is None:
            from ..data.packing import sample_lengths

            seq_lens = sample_lengths(batch)  # packed rows: attention is per sample
        crop = batch.get("images_spatial_crop")
        if crop is None:  # a text-only batch
            return self.lm_flops(seq_lens)
        n_tiles = int(((crop[..., 0] * crop[..., 1]) + 1).masked_fill(crop[..., 0] == 0, 0).sum())
        return self.lm_flops(seq_lens) + self.vision_flops(n_tiles)


def peak_rss_bytes() -> int:
    """This process's peak resident memory. Linux's VmHWM, not ru_maxrss: a child inherits its parent's peak into
    ru_maxrss across fork + exec (a subprocess of a 10 GB pytest reports 10 GB), VmHWM is its own address space's."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):  # no /proc (macOS: ru_maxrss in bytes there)
        scale = 1 if sys.platform == "darwin" else 1024
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def peak_memory_gb(device: torch.device) -> dict[str, float]:
    """Peak allocated/reserved CUDA memory, or the process's peak resident memory on CPU, in GB."""
    if device.type == "cuda":
        return {
            "mem/peak_allocated_gb": torch.cuda.max_memory_allocated(device) / 1e9,
            "mem/peak_reserved_gb": torch.cuda.max_memory_reserved(device) / 1e9,
        }
    return {"mem/peak_rss_gb": peak_rss_bytes() / 1e9}


def _jsonable(value):
    if isinstance(value, torch.Tensor):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # "nan" / "inf": JSON has no literal for them
    return value


def _parse(line: str) -> dict | None:
    """A metrics.jsonl line as a record; None for a blank line and for one that is not a whole record (the last
    line of a killed run can be cut off)."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) and isinstance(record.get("step"), int) else None


class MetricsLogger:
    """Writes records to <run dir>/metrics.jsonl (one JSON object per line) and, optionally, to W&B.

    Every record has `step` and `kind` ("train", "eval", "event"); metric names are `section/name`.
    Non-finite floats are written as the strings "nan" / "inf" / "-inf".
    """

    FILE = "metrics.jsonl"

    def __init__(self, run_dir: Path, jsonl: bool = True, wandb_run=None):
        self.path = Path(run_dir) / self.FILE if jsonl else None
        self.wandb = wandb_run

    def log(self, step: int, kind: str, metrics: dict) -> None:
        record = {"step": step, "kind": kind, **{k: _jsonable(v) for k, v in metrics.items()}}
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            numeric = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
            if numeric:
                self.wandb.log(numeric, step=step)

    def truncate_after(self, step: int) -> int:
        """Drop records past `step` (left by a killed run that is now resumed from `step`); returns how many."""
        if self.path is None or not self.path.exists():
            return 0
        lines = self.path.read_text(errors="replace").splitlines()
        keep = []
        for number, line in enumerate(lines, start=1):
            record = _parse(line)
            if record is None and line.strip():  # a line cut off by a killed run (or damaged)
                log.warning("%s line %d is not a whole JSON record, dropped: %.80r", self.path, number, line)
            elif record is not None and record["step"] <= step:
                keep.append(line)
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in keep))
        os.replace(tmp, self.path)
        return len(lines) - len(keep)


def read_metrics(run_dir: str | Path, kind: str | None = None) -> list[dict]:
    """The records of a run's metrics.jsonl, optionally of one kind."""
    path = Path(run_dir) / MetricsLogger.FILE
    records = [r for r in map(_parse, path.read_text(errors="replace").splitlines()) if r is not None]
    return [r for r in records if kind is None or r["kind"] == kind]


def init_wandb(logger_cfg, name: str, tags: list[str], run_dir: Path, config: dict, run_id: str | None):
    """A W&B run (offline unless WANDB_MODE says otherwise), resumed when `run_id` is given.

    Group, run name and tags come from the Hydra sweep the run belongs to (deepseek_vl2_lora/training/sweep.py);
    they, the run id and the project are also written to <run dir>/wandb_run.json, which is how
    `scripts/compare.py` and a human find the W&B run of a run dir."""
    import wandb

    from .sweep import hydra_context, wandb_names

    ctx = hydra_context()
    names = wandb_names(name, tags, run_dir, ctx, group=logger_cfg.group, run_name=logger_cfg.run_name)
    mode = os.environ.get("WANDB_MODE", logger_cfg.mode)
    run = wandb.init(
        project=logger_cfg.project,
        entity=logger_cfg.entity,
        group=names.group,
        job_type=logger_cfg.job_type,
        name=names.name,
        tags=names.tags,
        dir=str(run_dir),
        config={**config, "sweep": {"overrides": ctx.overrides, "sweep_dir": ctx.sweep_dir, "job_num": ctx.job_num}},
        mode=mode,
        id=run_id,
        resume="allow" if run_id else None,
    )
    meta = {
        "id": run.id,
        "project": logger_cfg.project,
        "entity": logger_cfg.entity,
        "group": names.group,
        "name": names.name,
        "tags": names.tags,
        "mode": mode,
        "overrides": ctx.overrides,
        "sweep_dir": ctx.sweep_dir,
        "job_num": ctx.job_num,
    }
    (Path(run_dir) / "wandb_run.json").write_text(json.dumps(meta, indent=2) + "\n")
    return run


def wandb_log_policy(run, report) -> None:
    """The trainable-parameter table as a W&B table, plus totals in the run summary."""
    import wandb

    columns = ["group", "mode", "modules", "params", "trainable", "note"]
    rows = [[g.group, g.mode, g.modules, g.params, g.trainable, g.note] for g in report.groups]
    run.log({"params/table": wandb.Table(columns=columns, data=rows)}, step=0)
    run.summary["params/trainable"] = report.trainable_params
    run.summary["params/total"] = report.total_params
