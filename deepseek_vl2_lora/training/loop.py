"""The training loop: `train(cfg, run_dir)`; its body, `_train`, reads from top to bottom.

    setup     model from a checkpoint dir (or a generated tiny one) -> freezing policy -> data -> engine
              (AdamW with the policy's per-group learning rates, warmup + cosine; one process or DeepSpeed
              ZeRO-2/3, `dist=`) -> resume -> loggers
    eval      the untrained model (loss and exact-match accuracy), unless resuming
    loop      grad_accum micro batches: bf16 autocast on CUDA (fp32 on CPU), objective = LM loss + MoE aux
              loss, backward; clip; a non-finite loss or grad norm skips the update (counted; N in a row
              stop the run); log; eval every N steps; atomic checkpoint every N steps
    finish    final eval, trained state (adapter + trained tensors) to <run dir>/trained, summary.json

Several ranks (DeepSpeed): every rank runs this same function on its own slice of each global batch
(train_state.batch_stream); each rank's LM loss is weighted by its share of the global micro batch's supervised
tokens, so the gradient DeepSpeed averages over ranks is the one-process gradient of micro batch × world size
(the MoE aux loss too with dist.global_padding=true: see _sync_micro_batch).
Every rank evaluates (ZeRO-3 needs all ranks in each forward); rank 0 alone writes metrics, W&B, reports and
trained/; each rank logs to logs/rank{R}.log.

Run-dir layout: config_resolved.yaml, trainable_parameters.json, data_report.json, data_skipped.jsonl, metrics.jsonl,
eval/step_XXXXXXXX.jsonl (predictions), checkpoints/step_XXXXXXXX/ + checkpoints/latest, trained/,
summary.json (plus .hydra/ and train.log from Hydra, wandb/ with logger=wandb, logs/ with several ranks).
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from ..data import CollateItems, EvalDataset, Mixture, SFTDataset, SkipBadSamples, unwrap_batch
from ..data.packing import sample_lengths
from ..data.processor import Collator, DeepseekVL2Processor, ProcessorConfigError, SampleError
from ..evaluation.benchmarks import BenchmarkError, BenchmarkSuite, parse_specs
from ..evaluation.eval_set import evaluate
from ..model.deepseek_vl2 import IGNORE_INDEX, DeepseekVL2ForCausalLM
from ..plan.batch import PlanError
from ..policy.groups import PolicyError, optimizer_param_groups, save_trained_state
from .config import ConfigError, as_train_config, check_config
from .engine import DistEnv, EngineError, build_engine, lr_factor, resolve_device
from .feature_cache import VisionFeatureCache
from .metrics import FlopModel, MetricsLogger, init_wandb, peak_flops, peak_memory_gb, wandb_log_policy
from .preemption import Preemption
from .preflight import REPO_ROOT, Preflight, preflight, resolve_data_file, resolve_model_dir  # noqa: F401 (eval.py)
from .run_lock import RunLock, RunLockError
from .step import autocast_for, micro_step, prepare_model, resolve_dtype, resolve_precision
from .train_state import (
    ResumeError,
    TrainState,
    agree_on_checkpoint,
    batch_stream,
    batches_per_epoch,
    clean_temporary,
    find_resume_checkpoint,
    load_checkpoint,
    save_checkpoint,
    seed_everything,
    set_rng_state,
    step_dir_name,
    total_steps,
)

log = logging.getLogger(__name__)
# Fault injection for the multi-process tests (tests/test_deepspeed.py): FAULT_ENV=<rank>:<step>:raise makes that
# rank raise when it starts optimizer step <step> (1-based); <rank>:<step>:nan makes its LM loss NaN in that step's
# first micro batch. They check that one failing rank ends the whole job, and that one rank's NaN skips the update
# on every rank.
FAULT_ENV = "DEEPSEEK_VL2_LORA_FAULT"


class TrainingError(RuntimeError):
    """The run cannot go on; the message says why and what to try."""


class NonFiniteError(TrainingError):
    pass


# Errors whose message is the whole story: train.py prints them without a traceback.
USER_ERRORS = (
    ConfigError,
    PolicyError,
    EngineError,
    ResumeError,
    TrainingError,
    SampleError,
    ProcessorConfigError,
    PlanError,
    BenchmarkError,
    RunLockError,
)


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    seconds: float
    eval_before: dict | None
    eval_after: dict | None
    nonfinite_skipped: int
    trained_dir: Path | None
    preempted: str | None = None  # the signal that stopped the run early (after a checkpoint), by name


# ------------------------------------------------------------------------------------------------ setup helpers
def load_model(model_cfg, precision: str, device: torch.device) -> tuple[DeepseekVL2ForCausalLM, Path]:
    """The configured checkpoint (real or generated tiny) on `device`, in the dtype `precision` implies."""
    model_dir = resolve_model_dir(model_cfg)
    model = DeepseekVL2ForCausalLM.from_pretrained(
        model_dir,
        torch_dtype=resolve_dtype(model_cfg.dtype, precision, device),
        attn_implementation=model_cfg.attn_implementation,
        experts_kernel=model_cfg.experts_kernel,
        device=device,
    )
    return model, model_dir


# Collated training-batch fields with one entry per token position, and the value a padded position holds.
_TOKEN_FIELDS = {
    "input_ids": None,
    "attention_mask": 0,
    "labels": IGNORE_INDEX,
    "position_ids": 0,
    "images_seq_mask": 0,
    "segment_ids": 0,  # packed batches only
}


def _pad_to_length(batch: dict, length: int, pad_id: int) -> dict:
    """Right-pad a collated training batch to `length` positions, as the collator pads (pad id, mask 0, label
    ignored, position 0, no image)."""
    extra = length - batch["input_ids"].shape[1]
    if extra <= 0:
        return batch
    out = dict(batch)
    for key, value in _TOKEN_FIELDS.items():
        if key not in batch:
            continue
        t = batch[key]
        out[key] = torch.cat([t, t.new_full((t.shape[0], extra), pad_id if value is None else value)], dim=1)
    return out


def _sync_micro_batch(engine, env: DistEnv, batch: dict, global_padding: bool, pad_id: int) -> tuple[dict, float]:
    """(this rank's micro batch, the weight on its mean token loss), agreed with the other ranks.

    The weight is world size × this rank's share of the global micro batch's supervised tokens: DeepSpeed averages
    gradients over ranks, so the result is the gradient of the global micro batch's token mean, as one process
    with micro batch × world size computes it. Exactly 1.0 with one process.

    `global_padding` (dist.global_padding) pads every rank's micro batch to the longest sequence of the global
    one, as one process pads: the LM loss does not depend on padding, but the MoE aux loss averages over padded
    positions too, so only then is the aux term (and the whole step) the one-process one.

    Under ZeRO-3 the frozen vision tower's sharded weights are gathered by the ranks that run it, so a micro batch
    with images on some ranks and none on others would hang: that is an error here instead."""
    if env.world_size == 1:
        return batch, 1.0
    supervised = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    has_images = int(bool(batch["images_spatial_crop"].any()))
    ranks = engine.gather_from_ranks([supervised, has_images, batch["input_ids"].shape[1]])
    total, with_images, longest = sum(r[0] for r in ranks), sum(r[1] for r in ranks), max(r[2] for r in ranks)
    if engine.kind == "zero3" and 0 < with_images < env.world_size:
        raise TrainingError(
            f"dist=zero3: {int(with_images)} of {env.world_size} ranks have images in this micro batch, the others "
            "only text; ZeRO-3 gathers the sharded vision weights only on ranks that run the vision tower, so the "
            "ranks would wait on each other forever. Use dist=zero2 (vision weights replicated), a larger "
            "trainer.micro_batch_size, or data where every micro batch has an image."
        )
    if global_padding:
        batch = _pad_to_length(batch, int(longest), pad_id)
    return batch, supervised * env.world_size / total if total else 1.0


def _injected_fault(env: DistEnv) -> tuple[int, str] | None:
    """(step, "raise" | "nan") when FAULT_ENV targets this rank."""
    value = os.environ.get(FAULT_ENV)
    if not value:
        return None
    rank, step, kind = value.split(":")
    if kind not in ("raise", "nan"):
        raise ValueError(f"{FAULT_ENV}={value}: expected <rank>:<step>:raise or <rank>:<step>:nan")
    return (int(step), kind) if int(rank) == env.rank else None


def _rank_logging(run_dir: Path, env: DistEnv) -> logging.Handler | None:
    """With several ranks: each rank logs to <run dir>/logs/rank{R}.log (rank 0 keeps Hydra's train.log too); the
    console gets rank 0's lines and the other ranks' warnings. Returns the handler added (None: one process)."""
    if env.world_size == 1:
        return None
    root = logging.getLogger()
    formatter = next((h.formatter for h in root.handlers if h.formatter), None)
    if not env.is_main:
        for h in list(root.handlers):
            if isinstance(h, logging.FileHandler):  # Hydra's train.log is rank 0's
                root.removeHandler(h)
                h.close()
            elif isinstance(h, logging.StreamHandler):
                h.setLevel(logging.WARNING)
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(run_dir / "logs" / f"rank{env.rank}.log")
    handler.setFormatter(formatter or logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
    handler.setLevel(logging.INFO)
    root.addHandler(handler)
    return handler


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, default=str) + "\n")


SKIPPED_FILE = "data_skipped.jsonl"  # every skipped line: {split, source, stage, location, reason, message}


def _write_skipped(path: Path, reports: dict) -> None:
    """Every record validation skipped, one JSON line each (data_report.json keeps 3 examples per reason); the
    train-time skips an earlier run of this run dir listed are kept (this run's are appended at its end)."""
    earlier = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                item = json.loads(line)
            except ValueError:
                continue
            if isinstance(item, dict) and item.get("stage") == "train":
                earlier.append(item)
    lines = [x for name, r in reports.items() for x in r.skipped_records(name) if x["stage"] == "validation"]
    path.write_text("".join(json.dumps(x) + "\n" for x in lines + earlier))


def _append_jsonl(path: Path, items: list[dict]) -> None:
    with open(path, "a") as f:
        f.writelines(json.dumps(x) + "\n" for x in items)


def _describe_eval(result_metrics: dict) -> str:
    parts = []
    if "eval/loss" in result_metrics:
        parts.append(f"loss {result_metrics['eval/loss']:.4f}")
    if "eval/accuracy" in result_metrics:
        parts.append(f"accuracy {result_metrics['eval/accuracy']:.3f} ({result_metrics['eval/samples']} samples)")
        by_type = {k.rsplit("/", 1)[1]: v for k, v in result_metrics.items() if k.startswith("eval/accuracy/")}
        if by_type:
            parts.append("[" + ", ".join(f"{k} {v:.2f}" for k, v in by_type.items()) + "]")
    return " ".join(parts) or "nothing to evaluate"


def _setup_model(cfg, device: torch.device, env: DistEnv, precision: str):
    """(model prepared for training, its checkpoint dir, policy report, FLOP model)."""
    model, model_dir = load_model(cfg.model, precision, device)
    seed_everything(cfg.seed)  # after loading: generating a tiny checkpoint on first use draws random numbers
    report = prepare_model(model, cfg)  # LoRA initialisation is the first consumer of the seeded RNG
    flop_model = FlopModel.from_model(model)  # before the engine: ZeRO-3 shards the weights in place
    if env.world_size > 1:  # initialisation above is the same on every rank; dropout draws differ per rank
        seed_everything(cfg.seed + 1_000_003 * (env.rank + 1))
    log.info("model %s (%s) on %s, %s\n%s", cfg.model.name, model_dir, device, precision, report.table())
    return model, model_dir, report, flop_model


@dataclass
class _Data:
    processor: DeepseekVL2Processor
    train_set: torch.utils.data.Dataset
    loss_set: SFTDataset | None  # the eval split, for the eval loss
    gen_set: EvalDataset | None  # the eval split, for generation
    reports: dict
    collator: Collator


def _setup_data(cfg, model, pre: Preflight, env: DistEnv) -> _Data:
    """The processor, the training and eval sets (validated by preflight) and the training collator."""
    tc = cfg.trainer
    processor, train_set, reports = pre.processor, pre.train_set, pre.reports
    if cfg.data.train_limit is not None:
        train_set = torch.utils.data.Subset(train_set, range(min(cfg.data.train_limit, len(train_set))))
    loss_set, gen_set = pre.loss_set, pre.gen_set
    for name, data_report in reports.items():
        if data_report.num_skipped:
            log.warning("%s data: %s", name, data_report)
    if len(train_set) < tc.micro_batch_size * env.world_size:
        raise ConfigError(
            f"the training set has {len(train_set)} usable samples, fewer than trainer.micro_batch_size="
            f"{tc.micro_batch_size} × {env.world_size} rank(s)"
        )
    if tc.vision_feature_cache:
        if model._vision_side_trainable():
            raise ConfigError("trainer.vision_feature_cache needs the vision tower and projector frozen by the policy")
        model.feature_cache = VisionFeatureCache(Path(tc.vision_feature_cache).expanduser(), model)
        log.info("vision feature cache: %s", model.feature_cache.dir)
    collator = Collator(
        processor.pad_id,
        padding_side="right",
        tile_keys=model.feature_cache is not None,
        pack_length=tc.pack_length,
    )
    return _Data(processor, train_set, loss_set, gen_set, reports, collator)


def _plan_steps(cfg, num_samples: int, env: DistEnv, reports: dict, run_dir: Path) -> int:
    """The run's optimizer steps (trainer.max_steps, or trainer.epochs over the data); logs the run dir, the data
    per split and source (layout, records, placeholders added) and the step plan."""
    tc = cfg.trainer
    per_step = tc.micro_batch_size * env.world_size * tc.grad_accum
    steps = total_steps(tc.max_steps, tc.epochs, num_samples, tc.micro_batch_size * env.world_size, tc.grad_accum)
    log.info("run dir: %s", run_dir)
    limits = {"train": (cfg.data.train_limit, "data.train_limit"), "eval": (cfg.data.eval_limit, "data.eval_limit")}
    for name, data_report in reports.items():  # (a mixture: train, then train/<name> per source, with its sampling)
        limit, key = limits.get(name, (None, None))
        used = f", using the first {limit} ({key})" if limit is not None and limit < data_report.kept else ""
        log.info("%s data: %s%s", name, data_report.summary(), used)
    rule = f"trainer.epochs={tc.epochs}" if tc.epochs is not None else f"trainer.max_steps={tc.max_steps}"
    if tc.epochs is not None and tc.max_steps is not None:
        rule += f" (trainer.max_steps={tc.max_steps} ignored)"
    log.info(
        "steps: %d by %s, %.2f epochs of %d samples, %d samples per step (micro batch %d × grad accum %d × %d rank(s))",
        steps,
        rule,
        steps * per_step / num_samples,
        num_samples,
        per_step,
        tc.micro_batch_size,
        tc.grad_accum,
        env.world_size,
    )
    return steps


@dataclass
class _StepStats:
    """One optimizer step as the logs see it (losses averaged, counts summed over ranks)."""

    lm_loss: float
    aux_loss: float
    grad_norm: float
    finite: bool
    tokens: int  # real tokens
    positions: int  # computed positions (padding included)
    samples: int
    flops: float
    seconds: float


def _log_step(metrics, state, cfg, max_steps: int, per_epoch: int, s: _StepStats, lrs: dict, peak, device) -> None:
    """The step's metrics record (every `log_every` steps, and on non-finite and last steps) and console line
    (every `print_every` steps)."""
    tc, oc = cfg.trainer, cfg.optim
    if state.step % tc.log_every == 0 or not s.finite or state.step == max_steps:
        record = {
            "train/loss": s.lm_loss,
            "train/aux_loss": s.aux_loss,
            "train/objective": s.lm_loss + s.aux_loss,
            "train/grad_norm": s.grad_norm,
            "train/lr": oc.lr * lr_factor(state.step - 1, max_steps, oc.warmup_steps, oc.min_lr_ratio),
            **{f"train/lr/{name}": lr for name, lr in lrs.items()},
            "train/epoch": state.epoch + state.batch / per_epoch,
            "train/tokens": s.tokens,
            "train/samples": s.samples,
            "train/padding": 1.0 - s.tokens / s.positions,  # share of computed positions that are padding
            "train/skipped": int(not s.finite),
            "train/nonfinite_total": state.nonfinite_total,
            "data/skipped_at_train": state.extra.get("skipped_at_train", 0),  # so far, all ranks
            "perf/step_time_s": s.seconds,
            "perf/tokens_per_s": s.tokens / s.seconds,
            "perf/samples_per_s": s.samples / s.seconds,
            "perf/tflops_per_s": s.flops / s.seconds / 1e12,
            "perf/mfu": s.flops / s.seconds / peak if peak else None,
            **peak_memory_gb(device),
        }
        metrics.log(state.step, "train", record)
    if state.step % tc.print_every == 0:
        memory = peak_memory_gb(device)
        mfu = f" MFU {s.flops / s.seconds / peak:.1%}" if peak else ""
        log.info(
            "step %d/%d loss %.4f aux %.4f grad norm %.3f tokens/s %.0f peak memory %.2f GB%s",
            state.step,
            max_steps,
            s.lm_loss,
            s.aux_loss,
            s.grad_norm,
            s.tokens / s.seconds,
            next(iter(memory.values())),
            mfu,
        )


def _resume_or_start(
    cfg, run_dir: Path, env: DistEnv, engine, num_samples: int, checked: Path | None = None, mixture=None
):
    """(train state, checkpoint resumed from or None, its RNG state or None) as `trainer.resume` says; `checked`:
    the checkpoint preflight found (and verified) for an explicit path; `mixture`: the training mixture's
    signature (its order depends on it; kept in the state's extra), None for one source."""
    tc = cfg.trainer
    state = TrainState(
        num_samples=num_samples,
        batch_size=tc.micro_batch_size,
        seed=cfg.seed,
        world_size=env.world_size,
        dist=cfg.dist.kind,
        extra={"mixture": mixture} if mixture is not None else {},
    )
    if env.is_main:
        clean_temporary(run_dir)
    # Rank 0 verifies the checkpoints' manifests (falling back past damaged ones); the others take its choice.
    if checked is None:  # (an explicit path was verified by preflight: its checksums are not read twice)
        resume_from = find_resume_checkpoint(tc.resume, run_dir, verify=env.is_main)
    else:
        resume_from = checked
    resume_from = agree_on_checkpoint(engine, resume_from)
    rng = None
    if resume_from is not None:
        state, rng = load_checkpoint(resume_from, engine, engine.load_trainable)
        fits = (state.num_samples, state.batch_size, state.seed) == (num_samples, tc.micro_batch_size, cfg.seed)
        if not fits:
            raise ResumeError(
                f"{resume_from}: its data position is for {state.num_samples} samples, micro batch "
                f"{state.batch_size}, seed {state.seed}; this run has {num_samples}, {tc.micro_batch_size}, "
                f"{cfg.seed}. Resume with the same data, trainer.micro_batch_size and seed."
            )
        if state.extra.get("mixture") != mixture:
            raise ResumeError(
                f"{resume_from}: its data order is for the mixture {state.extra.get('mixture')}; this run's is "
                f"{mixture}. Resume with the same data.train (sources, limits and weights)."
            )
        log.info("resumed from %s at step %d (epoch %d, batch %d)", resume_from, state.step, state.epoch, state.batch)
    elif tc.resume == "auto":
        log.info("trainer.resume=auto: no checkpoint in %s, starting from scratch", run_dir)
    return state, resume_from, rng


# ------------------------------------------------------------------------------------------------ the loop
def train(cfg, run_dir: str | Path) -> TrainResult:
    """Train as `cfg` (a composed TrainConfig) says, writing everything under `run_dir`."""
    cfg = as_train_config(cfg)
    check_config(cfg)
    if cfg.trainer.dry_run:  # plan memory on fake tensors instead of training (deepseek_vl2_lora/plan)
        from ..plan.planner import dry_run

        t0 = time.perf_counter()
        dry_run(cfg, Path(run_dir))
        return TrainResult(Path(run_dir), 0, time.perf_counter() - t0, None, None, 0, None)
    env = DistEnv.from_env()
    if cfg.dist.world_size is not None and cfg.dist.world_size != env.world_size:
        raise ConfigError(
            f"dist.world_size={cfg.dist.world_size} but this run was launched with {env.world_size} rank(s) "
            "(WORLD_SIZE); drop dist.world_size or launch that many ranks"
        )
    device = resolve_device(cfg.trainer.device, env)
    threads = torch.get_num_threads()
    if device.type == "cpu" and cfg.trainer.cpu_threads:
        torch.set_num_threads(cfg.trainer.cpu_threads)
    lock = RunLock.acquire(run_dir) if env.is_main else None  # under DeepSpeed rank 0 holds it for the job
    stop = Preemption()  # SIGTERM/SIGUSR1/SIGINT: finish the step, checkpoint, return (result.preempted)
    rank_log = _rank_logging(Path(run_dir), env)
    try:
        result = _train(cfg, Path(run_dir), env, device, stop)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # Tear the process group down while every rank is alive: left to interpreter exit, gloo's threads can
            # abort the process ("terminate called without an active exception") after a successful run.
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()
        return result
    except BaseException:
        if rank_log is not None:  # into this rank's log file only (the console shows it already)
            args = (env.rank, env.world_size)
            rank_log.handle(
                log.makeRecord(log.name, logging.ERROR, __file__, 0, "rank %d of %d failed", args, sys.exc_info())
            )
        raise
    finally:
        stop.close()
        if lock is not None:
            lock.release()
        torch.set_num_threads(threads)
        if rank_log is not None:
            logging.getLogger().removeHandler(rank_log)
            rank_log.close()


@dataclass
class _Run:
    """What the loop, its evaluations, checkpoints and teardown share (built by `_start`)."""

    cfg: Any
    run_dir: Path
    env: DistEnv
    device: torch.device
    autocast: Any
    model: DeepseekVL2ForCausalLM
    model_dir: Path
    data: _Data
    flop_model: FlopModel
    engine: Any
    state: TrainState
    max_steps: int
    metrics: MetricsLogger
    wandb_run: Any
    run_eval: Callable[[], Any]
    benchmarks: BenchmarkSuite
    peak: float | None  # peak FLOP/s for MFU (None: unknown)
    resume_from: Path | None
    rng: dict | None  # the RNG state to restore right before the loop (resumed runs)
    t_start: float

    def evaluate_and_log(self, tag: str) -> dict:
        """Eval split and benchmarks: logged, predictions written (rank 0); every rank calls it."""
        state = self.state
        result = self.run_eval()
        out = {**result.metrics(), **self.benchmarks(self.model, state.step, tag)}
        self.metrics.log(state.step, "eval", {"eval/tag": tag, **out})
        if self.env.is_main and result.predictions:
            (self.run_dir / "eval").mkdir(exist_ok=True)
            lines = "".join(json.dumps(p) + "\n" for p in result.predictions)
            (self.run_dir / "eval" / f"step_{state.step:08d}.jsonl").write_text(lines)
        log.info("eval (%s, step %d): %s", tag, state.step, _describe_eval(out))
        return out

    def save(self) -> Path | None:
        """A resumable checkpoint, unless the state is not finite (then nothing is written). Every rank calls it."""
        state = self.state
        trainable, finite = self.engine.gather_trainable()  # full tensors on rank 0; `finite` is the same on all
        if not state.last_step_finite or not finite:
            log.warning("step %d: not saving a checkpoint from a non-finite state", state.step)
            self.metrics.log(state.step, "event", {"event": "checkpoint_skipped_nonfinite"})
            return None
        path = save_checkpoint(self.run_dir, state, trainable, self.engine, self.cfg.trainer.keep_last)
        self.metrics.log(state.step, "event", {"event": "checkpoint", "path": str(path)})
        return path

    def seconds(self) -> float:
        return time.perf_counter() - self.t_start


def _start(cfg, run_dir: Path, env: DistEnv, device: torch.device) -> _Run:
    """Everything before the first step: preflight, model and policy, data, eval, step plan, engine, resume, run-dir
    files and loggers."""
    t_start = time.perf_counter()
    tc, oc = cfg.trainer, cfg.optim
    run_dir.mkdir(parents=True, exist_ok=True)
    precision = resolve_precision(tc.precision, device)
    autocast = autocast_for(precision, device)

    # -- model, freezing policy, data -----------------------------------------------------------------------
    pre = preflight(cfg, run_dir, env)  # files, data, resume path: all checked before the (slow) model load
    model, model_dir, report, flop_model = _setup_model(cfg, device, env, precision)
    data = _setup_data(cfg, model, pre, env)
    processor, train_set = data.processor, data.train_set
    run_eval = partial(
        evaluate,
        model,
        processor,
        data.loss_set,
        data.gen_set,
        device,
        batch_size=tc.eval_batch_size,
        max_new_tokens=tc.eval_max_new_tokens,
        limit=cfg.data.eval_limit,
        autocast=autocast,
        on_bad_sample=cfg.data.on_bad_sample,
    )
    benchmarks = BenchmarkSuite(  # loaded and checked now; baseline cached per model (one process only)
        parse_specs(tc.eval_benchmarks),
        processor,
        device,
        tc.eval_batch_size,
        tc.eval_max_new_tokens,
        autocast,
        baseline_key=(model_dir, {"precision": precision}) if env.world_size == 1 else None,
        out_dir=run_dir / "eval" if env.is_main else None,
    )

    # -- step plan, optimizer, schedule, engine -----------------------------------------------------------
    max_steps = _plan_steps(cfg, len(train_set), env, data.reports, run_dir)
    param_groups = optimizer_param_groups(model, cfg.policy, lr=oc.lr, weight_decay=oc.weight_decay)
    engine = build_engine(cfg.dist, model, param_groups, oc, max_steps, env, tc, precision)

    # -- resume -------------------------------------------------------------------------------------------
    mixture = train_set.signature() if isinstance(train_set, Mixture) else None
    state, resume_from, rng = _resume_or_start(cfg, run_dir, env, engine, len(train_set), pre.resume_from, mixture)

    # -- run-dir files, loggers -----------------------------------------------------------------------------
    wandb_run = None
    if env.is_main:
        (run_dir / "config_resolved.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
        report.write_json(run_dir / "trainable_parameters.json")
        _write_json(run_dir / "data_report.json", {name: r.to_dict() for name, r in data.reports.items()})
        _write_skipped(run_dir / SKIPPED_FILE, data.reports)
        if cfg.logger.wandb:
            resolved = OmegaConf.to_container(cfg, resolve=True)
            wandb_run = init_wandb(cfg.logger, cfg.name, cfg.tags, run_dir, resolved, state.wandb_id)
            state.wandb_id = wandb_run.id
            wandb_log_policy(wandb_run, report)
    metrics = MetricsLogger(run_dir, jsonl=cfg.logger.jsonl and env.is_main, wandb_run=wandb_run)
    if resume_from is not None:
        dropped = metrics.truncate_after(state.step)
        metrics.log(state.step, "event", {"event": "resume", "from": str(resume_from), "dropped_records": dropped})
    peak = tc.peak_flops or peak_flops(device, precision)
    return _Run(
        cfg, run_dir, env, device, autocast, model, model_dir, data, flop_model, engine, state, max_steps, metrics,
        wandb_run, run_eval, benchmarks, peak, resume_from, rng, t_start,
    )  # fmt: skip


def _train_stream(run: _Run):
    """(epoch, global batch index, collated micro batch) from the run's data position on; a sample gone bad since
    validation is replaced (skip) or comes back as one error line (`SkipBadSamples`)."""
    cfg, env = run.cfg, run.env
    return batch_stream(
        SkipBadSamples(run.data.train_set, cfg.data.on_bad_sample),
        CollateItems(run.data.collator, cfg.data.on_bad_sample),
        cfg.trainer.micro_batch_size,
        cfg.seed,
        run.state.epoch,
        run.state.batch,
        num_workers=cfg.data.num_workers,
        pin_memory=run.device.type == "cuda",
        rank=env.rank,
        world_size=env.world_size,
    )


def _train_step(run: _Run, stream, fault) -> tuple[_StepStats, dict]:
    """One optimizer step over grad_accum micro batches: (its stats, the learning rates it used)."""
    cfg, env, engine, state, data = run.cfg, run.env, run.engine, run.state, run.data
    tc = cfg.trainer
    train_report = data.reports["train"]
    source_reports = {k.removeprefix("train/"): r for k, r in data.reports.items() if k.startswith("train/")}
    t0 = time.perf_counter()
    lm_losses, aux_losses, tokens, positions, samples, flops, bad = [], [], 0, 0, 0, 0.0, 0
    for micro in range(tc.grad_accum):
        epoch, index, collated = next(stream)
        skipped_before = sum(train_report.skipped_at_train.values())
        batch = unwrap_batch(collated, train_report, source_reports)
        bad += sum(train_report.skipped_at_train.values()) - skipped_before
        state.advance(epoch, index)
        batch, weight = _sync_micro_batch(engine, env, batch, cfg.dist.global_padding, data.processor.pad_id)
        # Counted on the host batch, once: no device sync for them after the step.
        lengths = sample_lengths(batch)
        tokens += sum(lengths)
        positions += batch["input_ids"].numel()
        samples += len(lengths)
        flops += run.flop_model.batch_flops(batch, lengths)
        poison = micro == 0 and fault == (state.step + 1, "nan")
        last = micro == tc.grad_accum - 1
        lm, aux = micro_step(engine, batch, run.device, run.autocast, weight, tc.grad_accum, last, poison)
        lm_losses.append(lm)
        aux_losses.append(aux)
    lm_loss = float(torch.stack(lm_losses).mean())
    aux_loss = float(torch.stack(aux_losses).mean())
    if env.world_size > 1:  # the global step: losses averaged, counts summed over the ranks
        lm_sum, aux_sum, tokens, positions, samples, flops, bad = engine.sum_over_ranks(
            [lm_loss, aux_loss, tokens, positions, samples, flops, bad]
        )
        lm_loss, aux_loss = lm_sum / env.world_size, aux_sum / env.world_size
        tokens, samples, bad = int(tokens), int(samples), int(bad)
    state.extra["skipped_at_train"] = state.extra.get("skipped_at_train", 0) + bad  # all ranks'
    lrs = engine.lrs()  # the learning rates this step uses
    loss_finite = math.isfinite(lm_loss) and math.isfinite(aux_loss)
    grad_norm, finite = engine.optimizer_step(cfg.optim.grad_clip, loss_finite)
    if finite:
        state.nonfinite_streak = 0
    else:
        state.nonfinite_total += 1
        state.nonfinite_streak += 1
        log.warning(
            "step %d: non-finite (loss %s, aux %s, grad norm %s): update skipped (%d in a row)",
            state.step + 1,
            lm_loss,
            aux_loss,
            grad_norm,
            state.nonfinite_streak,
        )
    state.step += 1
    state.last_step_finite = finite
    state.tokens_seen += tokens
    state.samples_seen += samples
    if run.device.type == "cuda":
        torch.cuda.synchronize(run.device)
    seconds = time.perf_counter() - t0
    return _StepStats(lm_loss, aux_loss, grad_norm, finite, tokens, positions, samples, flops, seconds), lrs


def _check_nonfinite_streak(run: _Run, step: _StepStats, last_checkpoint: Path | None) -> None:
    """Stop (NonFiniteError) after trainer.max_consecutive_nonfinite steps in a row had a non-finite loss or norm."""
    state, limit = run.state, run.cfg.trainer.max_consecutive_nonfinite
    if state.nonfinite_streak >= limit > 0:
        run.metrics.log(state.step, "event", {"event": "stopped_nonfinite", "streak": state.nonfinite_streak})
        raise NonFiniteError(
            f"stopping at step {state.step}: {state.nonfinite_streak} consecutive steps had a non-finite "
            f"loss or gradient norm (last: loss {step.lm_loss}, aux loss {step.aux_loss}, grad norm "
            f"{step.grad_norm}); their updates were skipped, {state.nonfinite_total} skipped in all. Last "
            f"checkpoint: {last_checkpoint or 'none'}. Try a lower optim.lr, optim.grad_clip, "
            "trainer.precision=fp32, or check the data."
        )


def _train(cfg, run_dir: Path, env: DistEnv, device: torch.device, stop: Preemption) -> TrainResult:
    run = _start(cfg, run_dir, env, device)
    tc, state = cfg.trainer, run.state
    if run.resume_from is None and tc.eval_before and (run.data.gen_set is not None or run.benchmarks):
        state.eval_before = run.evaluate_and_log("before")
    if run.rng is not None:
        set_rng_state(run.rng)  # last, so nothing in setup shifts the restored streams
    stream = _train_stream(run)
    per_epoch = batches_per_epoch(len(run.data.train_set), tc.micro_batch_size * env.world_size)
    fault = _injected_fault(env)
    bar = tqdm(total=run.max_steps, initial=state.step, desc="train", disable=not (tc.progress_bar and env.is_main))
    last_checkpoint = run.resume_from
    preempted = False  # by a signal, before max_steps
    stop.arm()  # a signal from now on: checkpoint and stop (before: Interrupted, at once)
    with logging_redirect_tqdm():
        while state.step < run.max_steps:
            if stop.requested(run.engine):  # a signal on any rank, agreed by all: stop before the next step
                preempted = True
                break
            if fault == (state.step + 1, "raise"):
                raise RuntimeError(f"injected failure ({FAULT_ENV}) on rank {env.rank} at step {state.step + 1}")
            step, lrs = _train_step(run, stream, fault)
            _log_step(run.metrics, state, cfg, run.max_steps, per_epoch, step, lrs, run.peak, device)
            bar.update(1)
            bar.set_postfix(loss=f"{step.lm_loss:.4f}", lr=f"{lrs[next(iter(lrs))]:.2e}", refresh=False)
            _check_nonfinite_streak(run, step, last_checkpoint)
            if tc.eval_every and state.step % tc.eval_every == 0 and state.step < run.max_steps:
                run.evaluate_and_log("periodic")
            if tc.save_every and (state.step % tc.save_every == 0 or state.step == run.max_steps):
                last_checkpoint = run.save() or last_checkpoint
    bar.close()
    if preempted or stop.requested(run.engine):  # (a signal in the last step: the final eval etc. on the next run)
        return _stop_preempted(run, stop, last_checkpoint)
    return _finish(run)


def _stop_preempted(run: _Run, stop: Preemption, last_checkpoint: Path | None) -> TrainResult:
    """A signal stopped the run: a checkpoint of this step (unless there is one), a `preempted` event, no final eval
    or trained state (the resumed run does those)."""
    state = run.state
    if last_checkpoint is None or last_checkpoint.name != step_dir_name(state.step):
        last_checkpoint = run.save() or last_checkpoint
    where = str(last_checkpoint) if last_checkpoint else None
    run.metrics.log(state.step, "event", {"event": "preempted", "signal": stop.name, "checkpoint": where})
    log.warning(
        "%s: stopped after step %d, checkpoint %s; continue with trainer.resume=auto",
        stop.name or "a signal on another rank",
        state.step,
        where,
    )
    if run.wandb_run is not None:
        run.wandb_run.finish()
    return TrainResult(
        run.run_dir,
        state.step,
        run.seconds(),
        state.eval_before,
        None,
        state.nonfinite_total,
        None,
        preempted=stop.name or "signal",
    )


def _finish(run: _Run) -> TrainResult:
    """After the last step: final eval, cache stats, the data reports with train-time skips, the trained state
    (PEFT adapter), summary.json."""
    cfg, env, state, model, run_dir = run.cfg, run.env, run.state, run.model, run.run_dir
    eval_after = run.evaluate_and_log("after") if cfg.data.eval_path or run.benchmarks else None
    if model.feature_cache is not None:
        run.metrics.log(state.step, "event", {"event": "vision_cache", **model.feature_cache.stats()})
        log.info(
            "vision feature cache: %(vision_cache/hits)d hits, %(vision_cache/misses)d misses",
            model.feature_cache.stats(),
        )
    reports = run.data.reports
    if env.is_main and state.extra.get("skipped_at_train"):  # the data report, with this run's train-time skips
        _write_json(run_dir / "data_report.json", {name: r.to_dict() for name, r in reports.items()})
        train_lines = [x for x in reports["train"].skipped_records("train") if x["stage"] == "train"]
        _append_jsonl(run_dir / SKIPPED_FILE, train_lines)
        log.warning("train data: %d samples went bad during training and were skipped", state.extra["skipped_at_train"])
    trained_dir = None
    if cfg.trainer.save_trained:
        with run.engine.full_trainable_params():  # DeepSpeed: the fp32 master values, gathered on rank 0
            if env.is_main:
                trained_dir = save_trained_state(model, run_dir / "trained", base_model=run.model_dir)
    seconds = run.seconds()
    result = TrainResult(
        run_dir, state.step, seconds, state.eval_before, eval_after, state.nonfinite_total, trained_dir
    )
    if env.is_main:
        _write_json(
            run_dir / "summary.json", {k: str(v) if isinstance(v, Path) else v for k, v in vars(result).items()}
        )
    before = (state.eval_before or {}).get("eval/accuracy")
    after = (eval_after or {}).get("eval/accuracy")
    if after is not None:
        gain = f"before training {before:.3f} -> " if before is not None else ""
        log.info("eval accuracy: %safter %d steps %.3f", gain, state.step, after)
    log.info("done in %.1f s; run dir %s", seconds, run_dir)
    if run.wandb_run is not None:
        run.wandb_run.summary.update({k: v for k, v in (eval_after or {}).items()})
        run.wandb_run.finish()
    return result
