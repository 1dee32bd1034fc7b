"""Typed schema of the training config (`deepseek_vl2_lora/configs/train.yaml` and its groups), registered in
Hydra's ConfigStore.

`train.yaml` lists `base_train` first in its defaults, so every YAML group file and every command-line
override is merged into these dataclasses: a misspelled key (`trainer.max_stpes=3`) or a wrongly typed value
(`trainer.max_steps=abc`) fails when Hydra composes the config, with Hydra's own message, before anything runs.

Value checks that a type cannot express (a known precision name, micro batch ≥ 1, ...) are in `check_config`,
which the training function calls first.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, ListConfig, OmegaConf

from ..model.recompute import RECOMPUTE
from ..policy.config import PolicyConfig

HUB = "https://huggingface.co/"


@dataclass
class ModelConfig:
    name: str = "tiny_random"
    # A checkpoint directory in the official layout (config.json, *.safetensors, processor_config.json,
    # tokenizer files). Required for the real models; leave null with `tiny_family` set to generate a tiny
    # random checkpoint (cached under $DEEPSEEK_VL2_LORA_CACHE or ~/.cache/deepseek_vl2_lora).
    path: str | None = None
    tiny_family: str | None = None  # tiny-mha | small-mla | full-noaux (deepseek_vl2_lora.model.tiny.FAMILIES)
    tiny_seed: int = 0
    # Where the real checkpoint lives, e.g. deepseek-ai/deepseek-vl2-small: messages, and the trained dir's
    # base_model_name_or_path (set it to null when `path` is not that checkpoint, e.g. a merged one).
    hub_id: str | None = None
    # A config.json shipped with the repo (deepseek_vl2_lora/assets/released/<name>/) that a dry run
    # (trainer.dry_run=true) plans with when `path` is null: deepseek-vl2-tiny | deepseek-vl2-small | deepseek-vl2.
    released: str | None = None
    attn_implementation: str = "eager"  # eager | sdpa | flash_attention_2 | mla_* | mha_*
    experts_kernel: str = "auto"  # auto | loop | grouped
    # Storage dtype of the loaded weights: auto = bfloat16 when training runs in bf16 autocast, else float32.
    # Trainable parameters are always kept in float32 (master weights), whatever the storage dtype.
    dtype: str = "auto"  # auto | float32 | bfloat16
    # Start from trained state (a second stage, continued fine-tuning): a trained dir, its run dir or a stock PEFT
    # LoRA adapter for this architecture. Its policy replaces `policy`; optimizer and schedule start fresh. Not a
    # resume (trainer.resume continues this run from its own checkpoint). deepseek_vl2_lora/training/init_from.py
    init_from: str | None = None
    # Store the frozen language-model weights quantized (QLoRA-style), dequantized just in time for each matmul:
    # none | nf4 (4-bit NormalFloat, double-quantized scales: ~0.26 × bf16) | int8 (8-bit blockwise: ~0.51 × bf16).
    # Quantized: the dense MLP, shared and routed experts, and the attention projections the policy does not train
    # in full (deepseek_vl2_lora/policy/quantize.py); never embeddings, norms, routers, vision or projector.
    quantize: str = "none"
    quantize_lm_head: bool = False  # also store lm_head quantized (only with model.quantize)


@dataclass
class DataConfig:
    name: str = "demo"
    # Relative paths are tried against the working directory first, then against the repository root.
    train_path: str | None = "data/demo/train.jsonl"  # null when data.train lists sources (a mixture)
    eval_path: str | None = "data/demo/eval.jsonl"  # exact-match eval split (last turn = reference); null: none
    # A path may be .jsonl, .json, .parquet, a save_to_disk directory or a local copy of a Hub dataset repository
    # (deepseek_vl2_lora/data/records.py). The split of a dataset directory with several; null: its only split, or
    # train (train_path) / validation, val, test (eval_path).
    train_split: str | None = None
    eval_split: str | None = None
    image_root: str | None = None  # default: each data file's directory
    max_length: int | None = 4096
    overlong: str = "error"  # error | skip | truncate (training samples)
    on_bad_sample: str = "error"  # error | skip (counted in the data report)
    train_limit: int | None = None  # use only the first N valid training records (debugging, overfitting)
    eval_limit: int | None = None  # evaluate on the first N valid eval records
    num_workers: int = 0
    # Rotate images by their EXIF orientation tag. Off by default, as DeepSeek-VL2's official loader
    # (`Image.open(p).convert("RGB")`) does not: a model fine-tuned here then sees what it sees at inference.
    exif_transpose: bool = False
    # Rename a file's keys to the ones the record layouts use (deepseek_vl2_lora/data/layouts.py), ours: theirs,
    # e.g. data.columns={messages:conv,images:pics}; applied to every record before its layout is detected.
    # null: none. (Typed Any, checked in check_config: a typed dict would refuse new keys under Hydra's struct mode.)
    columns: Any = None
    # A mixture of training sources instead of train_path (set data.train_path=null), each sampled by its weight
    # (deepseek_vl2_lora/data/mixture.py): a list of {path, weight: 1.0, name: file stem or directory name,
    # split, image_root: data.image_root or the source's own directory, columns: data.columns, limit: the first
    # N kept records}, e.g. 'data.train=[{path:a.jsonl,weight:3},{path:b.jsonl,weight:1}]' data.train_path=null.
    # (Typed Any, checked in check_config, like columns.)
    train: Any = None
    # Images above this many pixels (null: no limit) are rejected (reason image_too_large: on_bad_sample decides) or,
    # with large_image=resize, shrunk once to fit (aspect kept) into a copy in cache_dir that training reads. The
    # default is PIL's own warning threshold (~9459×9459): the model sees at most 3×3 tiles of 384 px anyway.
    max_image_pixels: int | None = 89_478_485
    large_image: str = "reject"  # reject | resize
    # Where validation results are cached (image headers per file; each source's outcome per settings), so that a
    # restart, a resume and the other ranks validate nothing again (deepseek_vl2_lora/data/validation_cache.py).
    # null: ~/.cache/deepseek_vl2_lora/data ($DEEPSEEK_VL2_LORA_CACHE/data or $XDG_CACHE_HOME/... when set); false
    # or none: no cache. (Typed Any: a path or false.)
    cache_dir: Any = None
    # Token-budget batching: micro batches of this many tokens per rank instead of trainer.micro_batch_size
    # samples: tokens_per_micro_batch / trainer.pack_length packed rows, the samples binned into rows across the
    # dataset each epoch (deepseek_vl2_lora/data/budget.py). Needs trainer.pack_length (a multiple of it); a sample
    # longer than a row is over-long (data.overlong decides). null: trainer.micro_batch_size samples.
    tokens_per_micro_batch: int | None = None


@dataclass
class OptimConfig:
    name: str = "adamw"
    lr: float = 1e-4  # base learning rate; each policy group uses lr × its lr_scale
    weight_decay: float = 0.0  # on matrices only (norms, biases and vectors never decay)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    warmup_steps: int = 0  # linear warmup from lr/warmup_steps to lr
    min_lr_ratio: float = 0.1  # cosine decay ends at lr × min_lr_ratio at the last step
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping (the norm is still measured)


@dataclass
class TrainerConfig:
    max_steps: int | None = 100  # optimizer steps (a skipped non-finite step counts as a step)
    # Train for this many passes over the training set instead: when set it decides the step count (max_steps is
    # then ignored): ceil(epochs × batches per epoch / grad_accum) optimizer steps, batches of micro batch × ranks
    # (train_state.total_steps). Computed from the data, so a resumed run with the same data gets the same count.
    epochs: int | None = None
    micro_batch_size: int = 8
    grad_accum: int = 1  # micro batches per optimizer step
    precision: str = "auto"  # auto (bf16 autocast on CUDA with bf16 support, else fp32) | bf16 | fp32
    device: str = "auto"  # auto | cpu | cuda (cuda:$LOCAL_RANK)
    # torch intra-op threads when training on CPU; null: torch's default (all cores). On a shared machine one
    # thread degrades gracefully where several oversubscribe the cores and can run many times slower.
    cpu_threads: int | None = None
    # Activation recompute in the language model's layers (deepseek_vl2_lora/model/recompute.py): none | selective
    # (the attention's input norm and q/kv projections run again in backward, the attention kernel does not: a few
    # % more FLOPs) | full (every layer runs again). null: as gradient_checkpointing says, none when that is unset.
    recompute: str | None = None
    # The older switch: true = recompute full, false = not full; when set it wins over recompute (resolve_recompute).
    gradient_checkpointing: bool | None = None
    # Pack each micro batch's samples into rows of at most this many tokens (first-fit decreasing), each sample
    # attending only to itself with its own position ids; the loss is the unpacked one. null: one row per sample.
    pack_length: int | None = None
    # torch.compile each decoder layer (attention + FFN) for fused elementwise kernels; the first steps and each
    # new sequence length compile. Off by default: it pays off on long GPU runs, not in short or CPU ones.
    compile_blocks: bool = False
    log_every: int = 1  # metrics.jsonl / W&B every N steps
    print_every: int = 50  # a console line every N steps (the progress bar shows every step)
    progress_bar: bool = True
    eval_every: int = 0  # steps between evaluations; 0: only before (if eval_before) and after training
    eval_before: bool = True  # evaluate the untrained model first (skipped when resuming)
    eval_batch_size: int = 32
    eval_max_new_tokens: int = 8
    # Benchmarks in VLMEvalKit's TSV (or Hub parquet) format, run at every eval (deepseek_vl2_lora/benchmarks):
    # paths, or mappings {path, name, limit, task, circular, max_new_tokens}, e.g.
    # [data/demo/bench_mcq.tsv] or [{path: MMBench_DEV_EN.tsv, limit: 200}]. The untrained baseline is cached.
    eval_benchmarks: list[Any] = field(default_factory=list)
    save_every: int = 0  # steps between resumable checkpoints; 0: none
    keep_last: int = 2  # resumable checkpoints kept (oldest deleted first)
    save_trained: bool = True  # write the trained state (adapter + trained tensors) to <run dir>/trained
    # null: start fresh. auto: latest checkpoint in this run dir (fresh start if there is none; set
    # hydra.run.dir to the earlier run's directory). A path: a checkpoint dir or a run dir (its latest).
    resume: str | None = None
    max_consecutive_nonfinite: int = 5  # stop after this many non-finite steps in a row (0: never stop)
    peak_flops: float | None = None  # device peak FLOP/s for MFU; null: from the built-in table (None on CPU)
    # A directory: cache the frozen vision tower + projector output per image tile on disk and reuse it on later
    # epochs (keyed by the tile's pixels; a subdirectory per vision/projector weights). Single process only.
    vision_feature_cache: str | None = None
    # Plan instead of train: build the model at full size on fake tensors (no weights read, no GPU), run one
    # training step through the real code path and print the peak GPU memory per rank for one GPU, ZeRO-2 and
    # ZeRO-3 (plan.json in the run dir). The batch layout and routing it assumes are under `plan.`.
    dry_run: bool = False
    gpu_memory_gb: float = 80.0  # the GPU the dry run checks the plan against (GiB, as the card is sold: 80 = H100)


@dataclass
class PlanConfig:
    """What a dry run (trainer.dry_run=true) assumes about the data and the routing; printed with the plan.

    Every sample fills data.max_length tokens (the worst case the data allows) and carries `images_per_sample`
    images tiled `image_tiles` = [width, height] local tiles (+ the global view); `answer_fraction` of its text
    tokens are the supervised answer (the loss runs lm_head on those only)."""

    image_tiles: list[int] = field(default_factory=lambda: [2, 2])
    images_per_sample: int = 1
    answer_fraction: float = 0.5
    routing: str = "uniform"  # uniform | zipf: expert popularity ~ 1/rank^zipf_exponent (the bench's skewed router)
    zipf_exponent: float = 0.5


@dataclass
class LoggerConfig:
    name: str = "jsonl"
    jsonl: bool = True  # <run dir>/metrics.jsonl
    wandb: bool = False
    project: str = "deepseek_vl2_lora"
    entity: str | None = None
    group: str | None = None  # null: the experiment name
    run_name: str | None = None  # null: <experiment name>-<run dir name>
    job_type: str = "train"
    mode: str = "offline"  # offline | online | disabled; the WANDB_MODE environment variable wins


@dataclass
class DistConfig:
    """How training runs: one process, or DeepSpeed ZeRO under a launcher (scripts/launch_*.sh, docs/deepspeed.md).

    zero2 shards optimizer state and gradients over the ranks (weights replicated); zero3 shards the weights too,
    frozen ones included. The DeepSpeed JSON's batch, accumulation, clipping and precision fields are filled from
    trainer.* / optim.* (deepseek_vl2_lora.training.deepspeed_engine.deepspeed_config): one source of truth."""

    name: str = "single"
    kind: str = "single"  # single (one process, CPU or one GPU) | zero2 | zero3 (DeepSpeed)
    # A DeepSpeed JSON for zero2/zero3 (absolute, or relative to the working directory or the repo root);
    # null: deepseek_vl2_lora/configs/deepspeed/<kind>.json. Its "auto" fields are filled from the Hydra config.
    deepspeed_config: str | None = None
    offload_optimizer: bool = False  # ZeRO-Offload: optimizer state and step on the CPU
    offload_params: bool = False  # zero3 only: the weight shards live in CPU memory between uses
    # Pad every rank's micro batch to the longest sequence across ranks, as one process with micro batch ×
    # world size pads. The LM loss never depends on padding, but the MoE aux loss (seq_aux, as in the official
    # model) averages over padded positions, so only then are N ranks exactly the one-process run. Costs compute
    # on the padding; off: each rank pads to its own longest sample.
    global_padding: bool = False
    # Ranks the dry run plans ZeRO-2/ZeRO-3 for (null: $WORLD_SIZE when launched, else 8). A launched run checks
    # it against the ranks it really has.
    world_size: int | None = None


@dataclass
class TrainConfig:
    name: str = "default"  # experiment name: run dir, W&B group and run name
    seed: int = 0
    tags: list[str] = field(default_factory=list)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    plan: PlanConfig = field(default_factory=PlanConfig)


def register_configs() -> None:
    """Store the schema as `base_train` (idempotent; runs on import)."""
    ConfigStore.instance().store(name="base_train", node=TrainConfig)


register_configs()


class ConfigError(ValueError):
    """A config value that composes but cannot work; the message says what to change."""


def resolve_recompute(trainer_cfg) -> str:
    """trainer.recompute, with trainer.gradient_checkpointing as its older name: true means full, false means not
    full (selective stays selective). No shipped config sets the older name, so when it is set it was typed (or
    comes from a run made before trainer.recompute existed) and it wins: `experiment=vl2_small` (recompute: full)
    with `trainer.gradient_checkpointing=false` trains without recompute."""
    recompute, legacy = trainer_cfg.recompute, trainer_cfg.gradient_checkpointing
    if recompute is not None and recompute not in RECOMPUTE:
        raise ConfigError(f"trainer.recompute={recompute!r}: expected one of {', '.join(RECOMPUTE)}")
    if legacy is True:
        return "full"
    if legacy is False:
        return recompute if recompute in ("none", "selective") else "none"
    return recompute or "none"


_CHOICES = {
    "model.dtype": ("auto", "float32", "bfloat16"),
    "model.experts_kernel": ("auto", "loop", "grouped"),
    "model.quantize": ("none", "nf4", "int8"),
    "data.overlong": ("error", "skip", "truncate"),
    "data.on_bad_sample": ("error", "skip"),
    "data.large_image": ("reject", "resize"),
    "trainer.precision": ("auto", "bf16", "fp32"),
    "dist.kind": ("single", "zero2", "zero3"),
    "plan.routing": ("uniform", "zipf"),
    "logger.mode": ("offline", "online", "disabled"),
}
_POSITIVE = ("trainer.micro_batch_size", "trainer.grad_accum", "trainer.eval_batch_size")
_NON_NEGATIVE = (
    "trainer.eval_every",
    "trainer.save_every",
    "trainer.keep_last",
    "trainer.eval_max_new_tokens",
    "trainer.max_consecutive_nonfinite",
    "optim.warmup_steps",
    "optim.grad_clip",
    "optim.weight_decay",
    "data.num_workers",
)


def _unknown_keys(node: DictConfig, reference: DictConfig, prefix: str = "") -> list[str]:
    unknown = []
    for key in node.keys():
        if key not in reference:
            unknown.append(f"{prefix}{key}")
        elif isinstance(node[key], DictConfig) and isinstance(reference[key], DictConfig):
            unknown += _unknown_keys(node[key], reference[key], f"{prefix}{key}.")
    return unknown


def as_train_config(cfg) -> DictConfig:
    """A DictConfig checked against the schema (a composed Hydra config already is one; dicts get merged in).

    Hydra lets `+group.new_key=...` add keys even to a structured node; those are rejected here."""
    if not (isinstance(cfg, DictConfig) and OmegaConf.get_type(cfg) is TrainConfig):
        cfg = OmegaConf.merge(OmegaConf.structured(TrainConfig), cfg)
    unknown = _unknown_keys(cfg, OmegaConf.structured(TrainConfig))
    if unknown:
        raise ConfigError(f"unknown config key(s) {', '.join(unknown)}; see deepseek_vl2_lora/training/config.py")
    return cfg


MIXTURE_KEYS = ("path", "weight", "name", "split", "image_root", "columns", "limit")


def _is_columns(value) -> bool:
    return isinstance(value, DictConfig) and all(isinstance(k, str) and isinstance(v, str) for k, v in value.items())


def _mixture_problems(data: DictConfig) -> list[str]:
    """data.train (a list of sources, `data/mixture.py`) against data.train_path / data.train_limit: one line each."""
    sources = data.get("train")
    if sources is None:
        return [] if data.train_path else ["data.train_path=null and data.train=null: set one of them"]
    if not isinstance(sources, ListConfig) or len(sources) == 0:
        return [f"data.train={sources}: must be a non-empty list of sources, e.g. [{{path: a.jsonl, weight: 3}}]"]
    problems = []
    if data.train_path:
        problems.append("data.train lists sources: set data.train_path=null (it would be ignored)")
    if data.train_limit is not None:
        problems.append(
            f"data.train_limit={data.train_limit} does not apply to a mixture: set data.train_limit=null and give "
            "a source its own limit (data.train[i].limit)"
        )
    names = []
    for i, source in enumerate(sources):
        key = f"data.train[{i}]"
        if isinstance(source, str):  # a bare path: weight 1
            continue
        if not isinstance(source, DictConfig):
            problems.append(f"{key}={source}: must be a path or a mapping, e.g. {{path: a.jsonl, weight: 1}}")
            continue
        for name in source.keys():
            if name not in MIXTURE_KEYS:
                problems.append(f"{key}.{name}: unknown key; a source takes {', '.join(MIXTURE_KEYS)}")
        if not (isinstance(source.get("path"), str) and source.get("path")):
            problems.append(f"{key}: no path; give each source one, e.g. {{path: data/demo/train.jsonl, weight: 1}}")
        weight = source.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 < weight < float("inf"):
            problems.append(f"{key}.weight={weight}: must be a number > 0 (weights are relative, e.g. 3 and 1)")
        limit = source.get("limit")
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
            problems.append(f"{key}.limit={limit}: must be an integer ≥ 1 (or null: every kept record)")
        for name in ("name", "split", "image_root"):
            value = source.get(name)
            if value is not None and not (isinstance(value, str) and value):
                problems.append(f"{key}.{name}={value}: must be a non-empty string (or null)")
        if source.get("columns") is not None and not _is_columns(source.columns):
            problems.append(f"{key}.columns={source.columns}: must be a mapping of our key to the file's")
        if isinstance(source.get("name"), str):
            if source.name in names:
                problems.append(f"{key}.name={source.name}: another source has this name; give each a unique one")
            names.append(source.name)
    return problems


def _budget_problems(tokens: int | None, pack_length: int | None) -> list[str]:
    """data.tokens_per_micro_batch against trainer.pack_length (the row length)."""
    if tokens is None:
        return []
    key = f"data.tokens_per_micro_batch={tokens}"
    if tokens < 1:
        return [f"{key}: must be ≥ 1 (or null: trainer.micro_batch_size samples per micro batch)"]
    if pack_length is None:
        return [f"{key} packs rows of trainer.pack_length tokens: set it too, e.g. trainer.pack_length={tokens}"]
    if pack_length >= 1 and tokens % pack_length:
        return [f"{key}: must be a multiple of trainer.pack_length={pack_length} (whole rows per micro batch)"]
    return []


def _quantize_problems(cfg: DictConfig) -> list[str]:
    m = cfg.model
    if m.quantize not in ("nf4", "int8"):
        return ["model.quantize_lm_head=true needs model.quantize=nf4 or int8"] if m.quantize_lm_head else []
    from ..policy.quantize import quantize_conflicts

    problems = quantize_conflicts(cfg.policy, m.quantize, m.quantize_lm_head)
    if cfg.dist.kind == "zero3":
        problems.append(
            f"model.quantize={m.quantize} with dist=zero3: ZeRO-3 shards parameters, not the quantized weights "
            "(buffers); use dist=zero2 (quantized weights replicated, training state sharded)"
        )
    return problems


def check_config(cfg: DictConfig) -> None:
    """Checks that types cannot express; raises ConfigError naming the key and the allowed values."""
    problems = []
    for key, allowed in _CHOICES.items():
        value = OmegaConf.select(cfg, key)
        if value not in allowed:
            problems.append(f"{key}={value!r}: expected one of {', '.join(allowed)}")
    for key in _POSITIVE:
        if OmegaConf.select(cfg, key) < 1:
            problems.append(f"{key}={OmegaConf.select(cfg, key)}: must be ≥ 1")
    columns = cfg.data.columns
    if columns is not None and not (
        isinstance(columns, DictConfig) and all(isinstance(k, str) and isinstance(v, str) for k, v in columns.items())
    ):
        problems.append(f"data.columns={columns}: must be a mapping of our key to the file's, e.g. {{messages: conv}}")
    problems += _mixture_problems(cfg.data)
    if cfg.data.max_image_pixels is not None and cfg.data.max_image_pixels < 1:
        problems.append(f"data.max_image_pixels={cfg.data.max_image_pixels}: must be ≥ 1 (or null: no limit)")
    if not (cfg.data.cache_dir is None or isinstance(cfg.data.cache_dir, (str, bool))) or cfg.data.cache_dir is True:
        problems.append(f"data.cache_dir={cfg.data.cache_dir}: a directory, null (the default one) or false (none)")
    if cfg.trainer.epochs is None and cfg.trainer.max_steps is None:
        problems.append("trainer.max_steps and trainer.epochs are both null: set one of them")
    for key in ("trainer.max_steps", "trainer.epochs"):
        if OmegaConf.select(cfg, key) is not None and OmegaConf.select(cfg, key) < 1:
            problems.append(f"{key}={OmegaConf.select(cfg, key)}: must be ≥ 1 (or null)")
    for key in _NON_NEGATIVE:
        if OmegaConf.select(cfg, key) < 0:
            problems.append(f"{key}={OmegaConf.select(cfg, key)}: must be ≥ 0")
    if not 0.0 <= cfg.optim.min_lr_ratio <= 1.0:
        problems.append(f"optim.min_lr_ratio={cfg.optim.min_lr_ratio}: must be in [0, 1]")
    if len(cfg.optim.betas) != 2:
        problems.append(f"optim.betas={list(cfg.optim.betas)}: needs two values")
    elif not all(0.0 <= b < 1.0 for b in cfg.optim.betas):
        problems.append(f"optim.betas={list(cfg.optim.betas)}: each must be in [0, 1), e.g. [0.9, 0.95]")
    if not cfg.optim.lr > 0:
        problems.append(f"optim.lr={cfg.optim.lr}: must be > 0, e.g. 1e-4")
    if not cfg.optim.eps > 0:
        problems.append(f"optim.eps={cfg.optim.eps}: must be > 0, e.g. 1e-8")
    for name, group in cfg.policy.groups.items():
        if group.mode != "lora":
            continue
        key = f"policy.groups.{name}"
        if group.r < 1:
            problems.append(f"{key}.r={group.r}: the LoRA rank must be ≥ 1, e.g. 16")
        if not group.alpha > 0:
            problems.append(f"{key}.alpha={group.alpha}: must be > 0, e.g. 2 × r")
        if not 0.0 <= group.dropout < 1.0:
            problems.append(f"{key}.dropout={group.dropout}: must be in [0, 1)")
    if cfg.model.dtype == "bfloat16" and cfg.trainer.precision == "fp32":
        problems.append("model.dtype=bfloat16 needs bf16 autocast: set trainer.precision=bf16 (or auto on CUDA)")
    problems += _quantize_problems(cfg)
    if cfg.trainer.vision_feature_cache and cfg.dist.kind != "single":
        problems.append("trainer.vision_feature_cache works with dist=single only (each rank would need its share)")
    if cfg.dist.offload_params and cfg.dist.kind != "zero3":
        problems.append(f"dist.offload_params=true needs dist=zero3 (dist={cfg.dist.kind} keeps whole weights)")
    if cfg.trainer.compile_blocks and cfg.dist.kind != "single":
        problems.append("trainer.compile_blocks=true is tested with dist=single only (DeepSpeed hooks every module)")
    if cfg.trainer.pack_length is not None and cfg.trainer.pack_length < 1:
        problems.append(f"trainer.pack_length={cfg.trainer.pack_length}: must be ≥ 1 (or null: no packing)")
    problems += _budget_problems(cfg.data.get("tokens_per_micro_batch"), cfg.trainer.pack_length)
    if cfg.dist.world_size is not None and cfg.dist.world_size < 1:
        problems.append(f"dist.world_size={cfg.dist.world_size}: must be ≥ 1 (or null)")
    if cfg.trainer.gpu_memory_gb <= 0:
        problems.append(f"trainer.gpu_memory_gb={cfg.trainer.gpu_memory_gb}: must be > 0")
    if not 0.0 < cfg.plan.answer_fraction <= 1.0:
        problems.append(f"plan.answer_fraction={cfg.plan.answer_fraction}: must be in (0, 1]")
    if len(cfg.plan.image_tiles) != 2 or min(cfg.plan.image_tiles) < 1 or cfg.plan.images_per_sample < 0:
        problems.append(
            f"plan.image_tiles={list(cfg.plan.image_tiles)} / plan.images_per_sample={cfg.plan.images_per_sample}: "
            "need two tile counts ≥ 1 ([width, height]) and images_per_sample ≥ 0"
        )
    try:
        resolve_recompute(cfg.trainer)
    except ConfigError as e:
        problems.append(str(e))
    if cfg.trainer.cpu_threads is not None and cfg.trainer.cpu_threads < 1:
        problems.append(f"trainer.cpu_threads={cfg.trainer.cpu_threads}: must be ≥ 1 (or null)")
    if problems:
        if len(problems) == 1:  # one line
            raise ConfigError(f"invalid config: {problems[0]}")
        raise ConfigError("invalid config:\n  " + "\n  ".join(problems))
