"""A training run's setup, its evaluation and checkpoint hooks, and its teardown; the loop itself is loop.py.

    setup     model from a checkpoint dir (or a generated tiny one) -> freezing policy -> data -> engine
              (AdamW with the policy's per-group learning rates, warmup + cosine; one process or DeepSpeed
              ZeRO-2/3, `dist=`) -> resume -> loggers (`_start`, which returns the `_Run` the loop works on)
    hooks     `_Run.evaluate_and_log` (eval split and benchmarks), `_Run.save` (a resumable checkpoint)
    teardown  final eval, trained state (adapter + trained tensors) to <run dir>/trained, summary.json
              (`_finish`), or a checkpoint and a `preempted` event after a signal (`_stop_preempted`)

Run-dir layout: config_resolved.yaml, trainable_parameters.json, data_report.json, data_skipped.jsonl, metrics.jsonl,
eval/step_XXXXXXXX.jsonl (predictions), checkpoints/step_XXXXXXXX/ + checkpoints/latest, trained/,
summary.json (plus .hydra/ and train.log from Hydra, wandb/ with logger=wandb, logs/ with several ranks).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from ..data import EvalDataset, Mixture, SFTDataset
from ..data.collate import Collator
from ..data.processor import DeepseekVL2Processor
from ..evaluation.benchmarks import BenchmarkSuite, parse_specs
from ..evaluation.eval_set import evaluate
from ..evaluation.ranks import EvalRanks
from ..model.config import VL2Config
from ..model.deepseek_vl2 import DeepseekVL2ForCausalLM
from ..model.quant import describe_quantized
from ..policy.adapters import save_trained_state
from ..policy.groups import optimizer_param_groups
from ..policy.quantize import keep_unquantized
from .batching import Batching
from .config import ConfigError
from .dist_env import DistEnv
from .engine import build_engine
from .feature_cache import VisionFeatureCache
from .init_from import check_same_start, init_from_dir, load_init_from
from .metrics import FlopModel, MetricsLogger, init_wandb, peak_flops, wandb_log_policy
from .preemption import Preemption
from .preflight import Preflight, preflight, resolve_model_dir
from .step import autocast_for, prepare_model, resolve_dtype, resolve_precision
from .train_state import (
    ResumeError,
    TrainState,
    agree_on_checkpoint,
    clean_temporary,
    find_resume_checkpoint,
    load_checkpoint,
    save_checkpoint,
    seed_everything,
    step_dir_name,
)

log = logging.getLogger(__name__)


class TrainingError(RuntimeError):
    """The run cannot go on; the message says why and what to try."""


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
def load_model(model_cfg, precision: str, device: torch.device, policy_cfg=None) -> tuple[DeepseekVL2ForCausalLM, Path]:
    """The configured checkpoint (real or generated tiny) on `device`, in the dtype `precision` implies; under
    `model.quantize` its frozen language-model weights quantized as `policy_cfg` allows (policy/quantize.py)."""
    model_dir = resolve_model_dir(model_cfg)
    keep = None
    if model_cfg.quantize != "none" and policy_cfg is not None:
        keep = keep_unquantized(policy_cfg, VL2Config.from_file(model_dir / "config.json").language.use_mla)
    model = DeepseekVL2ForCausalLM.from_pretrained(
        model_dir,
        torch_dtype=resolve_dtype(model_cfg.dtype, precision, device),
        attn_implementation=model_cfg.attn_implementation,
        experts_kernel=model_cfg.experts_kernel,
        device=device,
        quantize=model_cfg.quantize,
        quantize_lm_head=model_cfg.quantize_lm_head,
        keep_unquantized=keep,
    )
    if model_cfg.quantize != "none":
        log.info("quantized base (model.quantize=%s): %s", model_cfg.quantize, describe_quantized(model))
    return model, model_dir


# Collated training-batch fields with one entry per token position, and the value a padded position holds.
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
    model, model_dir = load_model(cfg.model, precision, device, cfg.policy)
    seed_everything(cfg.seed)  # after loading: generating a tiny checkpoint on first use draws random numbers
    report = prepare_model(
        model, cfg.policy, cfg.trainer
    )  # LoRA initialisation is the first consumer of the seeded RNG
    init_from = init_from_dir(cfg.model)
    if init_from is not None:  # a new run from trained state: its values, as fp32 master weights
        load_init_from(model, init_from)
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
    batching: Batching  # micro batches of samples, or a token budget


def _setup_data(cfg, model, pre: Preflight, env: DistEnv) -> _Data:
    """The processor, the training and eval sets (validated by preflight), the batching and the collator."""
    tc = cfg.trainer
    processor, train_set, reports = pre.processor, pre.train_set, pre.reports
    if cfg.data.train_limit is not None:
        train_set = torch.utils.data.Subset(train_set, range(min(cfg.data.train_limit, len(train_set))))
    loss_set, gen_set = pre.loss_set, pre.gen_set
    for name, data_report in reports.items():
        if data_report.num_skipped:
            log.warning("%s data: %s", name, data_report)
    batching = Batching(cfg.data, tc, train_set, env.world_size, cfg.seed)
    batching.check()
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
    return _Data(processor, train_set, loss_set, gen_set, reports, collator, batching)


def _plan_steps(cfg, batching: Batching, reports: dict, run_dir: Path) -> int:
    """The run's optimizer steps (trainer.max_steps, or trainer.epochs over the data); logs the run dir, the data
    per split and source (layout, records, placeholders added) and the step plan; puts the packing per epoch
    (token-budget batching) into the train report."""
    tc = cfg.trainer
    steps = batching.total_steps(tc.max_steps, tc.epochs, tc.grad_accum)
    reports["train"].packing = batching.packing_report(steps, tc.grad_accum)
    log.info("run dir: %s", run_dir)
    limits = {"train": (cfg.data.train_limit, "data.train_limit"), "eval": (cfg.data.eval_limit, "data.eval_limit")}
    for name, data_report in reports.items():  # (a mixture: train, then train/<name> per source, with its sampling)
        limit, key = limits.get(name, (None, None))
        used = f", using the first {limit} ({key})" if limit is not None and limit < data_report.kept else ""
        log.info("%s data: %s%s", name, data_report.summary(), used)
    rule = f"trainer.epochs={tc.epochs}" if tc.epochs is not None else f"trainer.max_steps={tc.max_steps}"
    if tc.epochs is not None and tc.max_steps is not None:
        rule += f" (trainer.max_steps={tc.max_steps} ignored)"
    log.info("steps: %d by %s, %s", steps, rule, batching.describe(steps, tc.grad_accum))
    return steps


def _resume_or_start(
    cfg, run_dir: Path, env: DistEnv, engine, batching: Batching, checked: Path | None = None, mixture=None
):
    """(train state, checkpoint resumed from or None, its RNG state or None) as `trainer.resume` says; `checked`:
    the checkpoint preflight found (and verified) for an explicit path; `mixture`: the training mixture's
    signature (its order depends on it; kept in the state's extra), None for one source; a token budget's plan
    signature is kept there too (`budget`)."""
    tc = cfg.trainer
    num_samples, budget = batching.num_samples, batching.signature()
    init_from = init_from_dir(cfg.model)
    extra = {"mixture": mixture} if mixture is not None else {}
    if init_from is not None:
        extra["init_from"] = str(init_from)
    state = TrainState(
        num_samples=num_samples,
        batch_size=tc.micro_batch_size,
        seed=cfg.seed,
        world_size=env.world_size,
        dist=cfg.dist.kind,
        extra={**extra, "budget": budget} if budget is not None else extra,
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
        check_same_start(resume_from, init_from)  # before its tensors load: a different start, a different policy
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
        if state.extra.get("budget") != budget:
            raise ResumeError(
                f"{resume_from}: its data position is for the token budget {state.extra.get('budget')}; this run's "
                f"is {budget}. Resume with the same data, data.tokens_per_micro_batch and trainer.pack_length."
            )
        log.info("resumed from %s at step %d (epoch %d, batch %d)", resume_from, state.step, state.epoch, state.batch)
    elif tc.resume == "auto":
        log.info("trainer.resume=auto: no checkpoint in %s, starting from scratch", run_dir)
    return state, resume_from, rng


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
        """Eval split and benchmarks, split across the ranks: logged, predictions written (rank 0); every rank
        calls it and gets the metrics."""
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
    ranks = EvalRanks(env.rank, env.world_size, zero3=cfg.dist.kind == "zero3")  # each rank scores a slice
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
        ranks=ranks,
    )
    benchmarks = BenchmarkSuite(  # loaded and checked now; baseline cached per model (one process only)
        parse_specs(tc.eval_benchmarks),
        processor,
        device,
        tc.eval_batch_size,
        tc.eval_max_new_tokens,
        autocast,
        # cached per base model; a run from model.init_from does not start from the base: no cache
        baseline_key=(model_dir, {"precision": precision}) if env.world_size == 1 and not cfg.model.init_from else None,
        out_dir=run_dir / "eval" if env.is_main else None,
        ranks=ranks,
    )

    # -- step plan, optimizer, schedule, engine -----------------------------------------------------------
    max_steps = _plan_steps(cfg, data.batching, data.reports, run_dir)
    param_groups = optimizer_param_groups(model, cfg.policy, lr=oc.lr, weight_decay=oc.weight_decay)
    engine = build_engine(cfg.dist, model, param_groups, oc, max_steps, env, tc, precision, data.batching.micro_batch)

    # -- resume -------------------------------------------------------------------------------------------
    mixture = train_set.signature() if isinstance(train_set, Mixture) else None
    state, resume_from, rng = _resume_or_start(cfg, run_dir, env, engine, data.batching, pre.resume_from, mixture)

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
                trained_dir = save_trained_state(
                    model, run_dir / "trained", base_model=run.model_dir, hub_id=cfg.model.hub_id
                )
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
