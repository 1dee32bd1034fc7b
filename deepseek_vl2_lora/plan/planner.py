"""`trainer.dry_run=true`: the memory plan of a training config, per GPU, without weights or a GPU.

One steady-state training step of the full-size model runs on fake tensors (measure.py) and is measured per
category. The one-GPU column is that measurement; the ZeRO-2 / ZeRO-3 columns keep its activations and
temporaries (every rank runs its own micro batch) and replace the model states by DeepSpeed's sharded ones
(zero.py). A config fits a GPU when 1.05 × its peak + 1 GiB (CUDA context, cuBLAS/cuDNN workspaces and allocator
fragmentation, which `torch.cuda.max_memory_allocated` does not count) is at most `trainer.gpu_memory_gb`. When
it does not fit, the smallest change that fits is searched, in this order: more recompute (selective, then full),
a smaller micro batch (the global batch kept with more accumulation), a 4-bit frozen base (`model.quantize=nf4`,
where the policy allows it), ZeRO-2, ZeRO-3, optimizer offload. With a quantized base there is no ZeRO-3 column (it
does not shard quantized weights; training/config.py refuses the combination).
"""

from __future__ import annotations

import copy
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..model.config import RELEASED, RELEASED_DIR, VL2Config
from ..model.recompute import RECOMPUTE
from ..policy.quantize import quantize_conflicts
from ..training.batching import micro_batch_of
from ..training.config import as_train_config, check_config, resolve_recompute
from .batch import planned_length
from .kinds import KINDS
from .measure import FakeTrainingModel, StepMeasurement
from .tracker import MODEL_STATES
from .zero import zero_model_states, zero_settings

log = logging.getLogger(__name__)
GIB = 2**30
MICRO = "micro batch"  # a candidate change's micro batch: trainer.micro_batch_size, or rows of a token budget
ROWS = [
    ("weights", "weights (frozen, + buffers)"),
    ("trainable", "trainable weights"),
    ("gradients", "gradients"),
    ("optimizer", "optimizer state"),
    ("buffers", "ZeRO buffers / gathered"),
    ("activations", "activations"),
    ("temporaries", "temporaries"),
]


def released_config(name: str) -> VL2Config:
    if name not in RELEASED:
        from .batch import PlanError

        raise PlanError(f"model.released={name!r}: the shipped configs are {', '.join(RELEASED)}")
    return VL2Config.from_file(RELEASED_DIR / name / "config.json")


def model_config_for(model_cfg) -> tuple[VL2Config, str]:
    """The architecture to plan: model.path's config.json (no weights read), else the shipped released config,
    else the tiny family's generated checkpoint."""
    m = model_cfg
    if m.path is not None:
        path = Path(m.path).expanduser() / "config.json"
        if not path.is_file():
            from .batch import PlanError

            raise PlanError(f"model.path={m.path}: no config.json there; the dry run reads only that file")
        return VL2Config.from_file(path), str(path)
    if m.released is not None:
        return released_config(m.released), f"{m.released} (released config.json shipped with the repo)"
    from ..model.tiny import ensure_tiny_checkpoint

    path = ensure_tiny_checkpoint(m.tiny_family, seed=m.tiny_seed) / "config.json"
    return VL2Config.from_file(path), f"tiny family {m.tiny_family}"


def fits(peak_bytes: int, gpu_memory_gb: float) -> bool:
    return 1.05 * peak_bytes + GIB <= gpu_memory_gb * GIB


@dataclass
class Column:
    """One way to run the step: per-rank bytes by category and the peak."""

    name: str
    dist: str  # single | zero2 | zero3
    ranks: int
    by_category: dict[str, int]
    peak: int
    moment: str
    fits: bool

    def gib(self, key: str) -> float:
        return self.by_category.get(key, 0) / GIB


def _single_column(m: StepMeasurement, gpu_gb: float) -> Column:
    by = dict(m.peak.by_category)
    by["buffers"] = 0
    return Column("1 GPU", "single", 1, by, m.peak.total, m.peak.moment, fits(m.peak.total, gpu_gb))


def _zero_column(m: StepMeasurement, stage: int, ranks: int, ds_config: dict, offload: bool, gpu_gb: float) -> Column:
    """Model states by ZeRO's rules; forward/backward activations and temporaries as measured (every rank runs its
    own micro batch); the optimizer step's scratch over this rank's shard (none on the GPU when offloaded). The
    peak is the larger of backward and the optimizer step."""
    states = zero_model_states(m.counts, stage, ranks, ds_config, offload)
    backward = {**states, "activations": m.peak_transient.by_category["activations"]}
    backward["temporaries"] = m.peak_transient.by_category["temporaries"]
    step = {**states, "activations": 0, "temporaries": 0 if offload else m.step_temporaries // ranks}
    by, moment = (backward, m.peak_transient.moment)
    if sum(step.values()) > sum(backward.values()):
        by, moment = step, "optimizer step"
    peak = sum(by.values())
    name = f"ZeRO-{stage} ×{ranks}" + (" offload" if offload else "")
    return Column(name, f"zero{stage}", ranks, by, peak, moment, fits(peak, gpu_gb))


@dataclass
class Plan:
    model: str
    source: str
    policy: str
    params_total: int
    params_trainable: int
    setting: dict
    layout: dict
    measurement: dict
    columns: list[Column]
    configured: str  # name of the column the config runs as
    fits: bool
    change: dict | None = None  # the smallest change that fits: overrides and its column
    notes: list[str] = field(default_factory=list)
    activations: list[dict] = field(default_factory=list)  # by module kind (activation_breakdown)
    recompute: dict = field(default_factory=dict)  # the setting and the FLOPs it adds (recompute_cost)


def activation_breakdown(m: StepMeasurement) -> list[dict]:
    """Per module kind: activation bytes at the step's peak, bytes the forward pass leaves for backward (alive when
    backward starts) and those per token position and per decoder layer holding the kind (layer kinds only)."""
    rows = []
    for kind in KINDS:
        at_peak, saved = m.peak.activation_kinds.get(kind, 0), m.end_of_forward.get(kind, 0)
        if not (at_peak or saved):
            continue
        layers = m.layers_per_kind.get(kind)
        per = saved / (m.positions * layers) if layers else None
        rows.append(
            {
                "kind": kind,
                "at_peak_bytes": at_peak,
                "saved_for_backward_bytes": saved,
                "saved_per_token_per_layer_bytes": None if per is None else round(per, 1),
            }
        )
    return rows


def recompute_cost(m: StepMeasurement, setting: str) -> dict:
    """The FLOPs recompute adds per optimizer step (matmuls and attention, as counted while the step ran) and their
    share of the step's own forward + backward FLOPs."""
    f = m.counted_flops
    step = f["forward"] + f["backward"]
    return {
        "setting": setting,
        "extra_flops_per_step": f["recompute"],
        "step_flops_counted": step,
        "extra_fraction": f["recompute"] / step if step else 0.0,
    }


class Planner:
    def __init__(self, cfg, ranks: int):
        from ..training.deepspeed_engine import deepspeed_config

        self.cfg, self.ranks = cfg, ranks
        self.vl2_config, self.source = model_config_for(cfg.model)
        self.micro_batch = micro_batch_of(cfg.data, cfg.trainer)  # samples, or full rows of a token budget
        self.budget = cfg.data.get("tokens_per_micro_batch")
        self.ds_configs = {}
        for kind in ("zero2", "zero3"):
            dist = cfg.dist if cfg.dist.kind == kind else _dist_like(cfg.dist, kind)
            self.ds_configs[kind] = deepspeed_config(dist, cfg.trainer, cfg.optim, "bf16", ranks, self.micro_batch)
        self.threshold = zero_settings(self.ds_configs["zero3"])["stage3_param_persistence_threshold"]
        self.fake = FakeTrainingModel(cfg, self.vl2_config, "cuda", self.threshold)
        self._fakes = {cfg.model.quantize: self.fake}  # another quantization: built when the search needs it
        self._measured: dict[tuple[int, str, str], StepMeasurement] = {}
        self.recompute = resolve_recompute(cfg.trainer)

    def measure(self, micro_batch_size: int, recompute: str, quantize: str | None = None) -> StepMeasurement:
        quantize = quantize or self.cfg.model.quantize
        key = (micro_batch_size, recompute, quantize)
        if key not in self._measured:
            if quantize not in self._fakes:
                cfg = copy.deepcopy(self.cfg)
                cfg.model.quantize = quantize
                self._fakes[quantize] = FakeTrainingModel(cfg, self.vl2_config, "cuda", self.threshold)
            self._measured[key] = self._fakes[quantize].measure(micro_batch_size, recompute)
        return self._measured[key]

    def columns(self, m: StepMeasurement, offload: bool) -> list[Column]:
        gb = self.cfg.trainer.gpu_memory_gb
        columns = [_single_column(m, gb), _zero_column(m, 2, self.ranks, self.ds_configs["zero2"], offload, gb)]
        if not m.counts.quantized_bytes:  # ZeRO-3 does not shard quantized weights
            columns.append(_zero_column(m, 3, self.ranks, self.ds_configs["zero3"], offload, gb))
        return columns

    def _configured(self, columns: list[Column], kind: str) -> Column:
        return next(c for c in columns if c.dist == kind)

    def smallest_change(self) -> dict | None:
        """The first candidate (in the module docstring's order) whose configured column fits."""
        tc, dist = self.cfg.trainer, self.cfg.dist
        mb, recompute, kind, offload = self.micro_batch, self.recompute, dist.kind, dist.offload_optimizer
        sizes = []
        while mb > 1:
            mb //= 2
            sizes.append(mb)
        # more recompute, cheapest first: selective before full
        more = [{"trainer.recompute": r} for r in RECOMPUTE[RECOMPUTE.index(recompute) + 1 :]]
        candidates = list(more)
        candidates += [{MICRO: s} for s in sizes]
        candidates += [{**r, MICRO: s} for r in more for s in sizes]
        m = self.cfg.model
        if m.quantize == "none" and not quantize_conflicts(self.cfg.policy, "nf4", m.quantize_lm_head):
            nf4 = {"model.quantize": "nf4"}
            candidates += [nf4] + [{**nf4, **r} for r in more]
            candidates += [{**nf4, **r, MICRO: s} for r in [{}, *more] for s in sizes]
        stages = {"single": ["zero2", "zero3"], "zero2": ["zero3"], "zero3": []}[kind]
        if m.quantize != "none":  # ZeRO-3 does not shard quantized weights
            stages = [stage for stage in stages if stage != "zero3"]
        candidates += [{"dist": stage, **r} for stage in stages for r in [{}, *more]]
        if not offload:
            full = {} if recompute == "full" else {"trainer.recompute": "full"}
            for stage in [k for k in (kind, *stages) if k != "single"]:
                candidates.append({"dist": stage, **full, "dist.offload_optimizer": True})
        for change in candidates:
            m = self.measure(
                change.get(MICRO, self.micro_batch),
                change.get("trainer.recompute", recompute),
                change.get("model.quantize"),
            )
            columns = self.columns(m, change.get("dist.offload_optimizer", offload))
            column = self._configured(columns, change.get("dist", kind))
            if column.fits:
                overrides = dict(change)
                if MICRO in overrides:
                    factor = self.micro_batch // overrides[MICRO]
                    overrides["trainer.grad_accum"] = tc.grad_accum * factor  # keeps the global batch
                    rows = overrides.pop(MICRO)
                    if self.budget:  # (a token budget: whole rows)
                        overrides = {"data.tokens_per_micro_batch": rows * tc.pack_length, **overrides}
                    else:
                        overrides = {"trainer.micro_batch_size": rows, **overrides}
                if "trainer.recompute" in overrides and tc.gradient_checkpointing is not None:
                    overrides["trainer.gradient_checkpointing"] = None  # the older switch would contradict it
                if "dist" in overrides and overrides["dist"] != "single":
                    overrides["dist.world_size"] = self.ranks
                    if kind == "single":  # N ranks each run a micro batch: fewer accumulation steps, same batch
                        accum = overrides.get("trainer.grad_accum", tc.grad_accum)
                        overrides["trainer.grad_accum"] = max(1, accum // self.ranks)
                cost = recompute_cost(m, change.get("trainer.recompute", recompute))
                return {"overrides": overrides, "column": column, "recompute": cost}
        return None

    def plan(self) -> Plan:
        tc, dist = self.cfg.trainer, self.cfg.dist
        m = self.measure(self.micro_batch, self.recompute)
        columns = self.columns(m, dist.offload_optimizer)
        configured = self._configured(columns, dist.kind)
        change = None if configured.fits else self.smallest_change()
        setting = self.fake.setting
        report = self.fake.report
        return Plan(
            model=self._model_name(),
            source=self.source,
            policy=report.policy,
            params_total=report.total_params,
            params_trainable=report.trainable_params,
            setting={
                "precision": setting.precision,
                "storage dtype": str(setting.dtype).replace("torch.", ""),
                "quantize": self.cfg.model.quantize,
                "quantized weights GiB": round(m.counts.quantized_bytes / GIB, 3),
                "attention": m.attention,
                "experts kernel": setting.experts_kernel,
                "recompute": self.recompute,
                "micro batch": self.micro_batch,
                "grad accum": tc.grad_accum,
                "sequence length": planned_length(self.cfg.data, tc),
                "packing": tc.pack_length,
                "token budget": self.budget,
                "routing": self.cfg.plan.routing
                + (f" (Zipf {self.cfg.plan.zipf_exponent})" if self.cfg.plan.routing == "zipf" else ""),
                "ranks for ZeRO": self.ranks,
                "gpu memory GiB": tc.gpu_memory_gb,
            },
            layout=m.layout,
            measurement={"tokens per step": m.tokens, "samples per step": m.samples, "flops per step": m.flops},
            columns=columns,
            configured=configured.name,
            fits=configured.fits,
            change=change,
            notes=setting.notes
            + (
                ["dist.offload_params=true is not modelled: weight shards are planned on the GPU"]
                if dist.offload_params
                else []
            )
            + (
                [
                    "quantized frozen weights: no ZeRO-3 column (DeepSpeed does not partition them); dequantized "
                    "copies exist one matmul at a time (counted in activations / temporaries)"
                ]
                if m.counts.quantized_bytes
                else []
            ),
            activations=activation_breakdown(m),
            recompute=recompute_cost(m, self.recompute),
        )

    def _model_name(self) -> str:
        m = self.cfg.model
        return m.released or m.name


def _dist_like(dist_cfg, kind: str):
    """dist_cfg with another ZeRO stage and DeepSpeed's default template (for the columns the config does not run)."""
    from types import SimpleNamespace

    return SimpleNamespace(
        kind=kind, deepspeed_config=None, offload_optimizer=dist_cfg.offload_optimizer, offload_params=False
    )


def ranks_for(dist_cfg) -> int:
    if dist_cfg.world_size:
        return int(dist_cfg.world_size)
    env = int(os.environ.get("WORLD_SIZE", 1))
    return env if env > 1 else 8


# ------------------------------------------------------------------------------------------------ reporting
def format_plan(plan: Plan) -> str:
    s, lay = plan.setting, plan.layout
    lines = [
        f"Memory plan for {plan.model} ({plan.source}): {_count(plan.params_total)} parameters, "
        f"{_count(plan.params_trainable)} trainable (policy {plan.policy})",
        (
            f"  step: micro batch {s['micro batch']} × {s['sequence length']} tokens"
            + (f", packed into rows of {s['packing']}" if s["packing"] else "")
            if not s.get("token budget")
            else f"  step: token budget {s['token budget']} = {s['micro batch']} full rows of {s['packing']} tokens"
        )
        + f", grad accum {s['grad accum']}, {s['precision']} (weights {s['storage dtype']}"
        + (f"; LM weights {s['quantize']}, {s['quantized weights GiB']:.2f} GiB" if s["quantize"] != "none" else "")
        + "),"
        f" recompute {s['recompute']}, experts kernel {s['experts kernel']}",
        f"  sample: {lay['images']} image(s) × {lay['tiles_per_image']} tiles = {lay['image_tokens']} image tokens,"
        f" {lay['text_tokens']} text tokens of which {lay['supervised_tokens']} supervised; routing {s['routing']}",
        "  attention kernel assumed: " + "; ".join(s["attention"]),
    ]
    lines += [f"  note: {n}" for n in plan.notes]
    cols = plan.columns
    width = 28
    lines.append("")
    lines.append("  " + "GiB per GPU".ljust(width) + "".join(c.name.rjust(14) for c in cols))
    for key, label in ROWS:
        lines.append("  " + label.ljust(width) + "".join(f"{c.gib(key):14.2f}" for c in cols))
    lines.append("  " + "peak".ljust(width) + "".join(f"{c.peak / GIB:14.2f}" for c in cols))
    fit_label = f"fits {s['gpu memory GiB']:g} GB"
    lines.append("  " + fit_label.ljust(width) + "".join(("yes" if c.fits else "no").rjust(14) for c in cols))
    lines.append("  peak at: " + "; ".join(f"{c.moment} ({c.name})" for c in cols))
    meas = plan.measurement
    lines.append(
        f"  per step and GPU: {meas['tokens per step']:,} tokens, {meas['samples per step']} samples, "
        f"{meas['flops per step'] / 1e12:,.1f} TFLOP"
    )
    lines += [""] + format_breakdown(plan.activations, plan.recompute)
    lines.append("")
    verdict = "fits" if plan.fits else "does NOT fit"
    lines.append(f"As configured ({plan.configured}): {verdict} a {s['gpu memory GiB']:g} GB GPU.")
    if not plan.fits:
        if plan.change is None:
            lines.append(
                "No change searched (recompute, micro batch 1, model.quantize=nf4, ZeRO-2/3, optimizer offload) fits; "
                "more GPUs "
                "(dist.world_size), a shorter data.max_length or a smaller policy would."
            )
        else:
            c = plan.change["column"]
            args = " ".join(f"{k}={_override(v)}" for k, v in plan.change["overrides"].items())
            cost = plan.change["recompute"]
            extra = f", recompute +{100 * cost['extra_fraction']:.1f} % FLOPs" if cost["extra_flops_per_step"] else ""
            lines.append(f"Smallest change that fits: {args}  ({c.name}: peak {c.peak / GIB:.2f} GiB{extra})")
    return "\n".join(lines)


def format_breakdown(rows: list[dict], recompute: dict) -> list[str]:
    lines = ["  activations by module kind   GiB at peak   saved for backward: GiB   KB per token and layer"]
    for r in rows:
        per = r["saved_per_token_per_layer_bytes"]
        lines.append(
            f"  {r['kind']:<28}{r['at_peak_bytes'] / GIB:>11.2f}{r['saved_for_backward_bytes'] / GIB:>26.2f}"
            + (f"{per / 1000:>25.1f}" if per is not None else "")
        )
    lines.append(
        f"  recompute {recompute['setting']}: {recompute['extra_flops_per_step'] / 1e12:,.1f} TFLOP per step extra "
        f"({100 * recompute['extra_fraction']:.1f} % of the step's matmul and attention FLOPs)"
    )
    return lines


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n:,}"


def _override(value) -> str:
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def plan_to_dict(plan: Plan) -> dict:
    def column(c: Column) -> dict:
        return {
            "name": c.name,
            "dist": c.dist,
            "ranks": c.ranks,
            "bytes": c.by_category,
            "peak_bytes": c.peak,
            "peak_gib": round(c.peak / GIB, 3),
            "peak_moment": c.moment,
            "fits": c.fits,
        }

    out = {k: v for k, v in vars(plan).items() if k not in ("columns", "change")}
    out["columns"] = [column(c) for c in plan.columns]
    out["model_states"] = list(MODEL_STATES)
    if plan.change is not None:
        change = plan.change
        out["change"] = {
            "overrides": change["overrides"],
            "column": column(change["column"]),
            "recompute": change["recompute"],
        }
    return out


def dry_run(cfg, run_dir: Path) -> Plan:
    """Plan `cfg` (`trainer.dry_run=true`: train.py calls this instead of training), print the plan, write
    <run dir>/plan.json."""
    cfg = as_train_config(cfg)
    check_config(cfg)
    run_dir = Path(run_dir)
    planner = Planner(cfg, ranks_for(cfg.dist))
    plan = planner.plan()
    log.info("\n%s", format_plan(plan))
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "plan.json").write_text(json.dumps(plan_to_dict(plan), indent=2, default=str) + "\n")
    log.info("plan written to %s", run_dir / "plan.json")
    return plan
