"""The training loop: `train(cfg, run_dir)`; its body, `_train`, reads from top to bottom.

    setup     run.py's `_start`: preflight, model, freezing policy, data, engine, resume, loggers
    eval      the untrained model (loss and exact-match accuracy), unless resuming
    loop      grad_accum micro batches (`_train_step`): bf16 autocast on CUDA (fp32 on CPU), objective = LM loss +
              MoE aux loss, backward (step.micro_step); clip; a non-finite loss or grad norm skips the update
              (counted; N in a row stop the run); log; eval every N steps; atomic checkpoint every N steps
    finish    run.py's `_finish`: final eval, trained state (adapter + trained tensors), summary.json

Several ranks (DeepSpeed): every rank runs this same function on its own slice of each global batch
(data.sampling.batch_stream, or its rows of a token-budget micro batch: data.budget); each rank's LM loss is
weighted by its share of the global micro batch's supervised tokens, so the gradient DeepSpeed averages over ranks
is the one-process gradient of micro batch × world size (the MoE aux loss too with dist.global_padding=true: see
_sync_micro_batch).
Evaluation is split across the ranks, each scoring a slice of the eval split and of every benchmark, with the
results gathered (evaluation/ranks.py: the same metrics as one process; under ZeRO-3 every rank runs every
forward); rank 0 alone writes metrics, W&B, reports and trained/; each rank logs to logs/rank{R}.log.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from ..data import CollateItems, SkipBadSamples, unwrap_batch
from ..data.packing import sample_lengths
from ..data.processor import SampleError
from ..evaluation.benchmarks import BenchmarkError
from ..model.deepseek_vl2 import IGNORE_INDEX
from ..model.processor_config import ProcessorConfigError
from ..policy.groups import PolicyError
from .config import ConfigError, as_train_config, check_config
from .dist_env import DistEnv, EngineError, resolve_device
from .init_from import apply_init_from
from .metrics import peak_memory_gb
from .optim import lr_factor
from .preemption import Preemption
from .run import TrainingError, TrainResult, _finish, _rank_logging, _Run, _start, _stop_preempted
from .run_lock import RunLock, RunLockError
from .step import micro_step
from .train_state import ResumeError, set_rng_state

log = logging.getLogger(__name__)
# Fault injection for the multi-process tests (tests/test_deepspeed.py): FAULT_ENV=<rank>:<step>:raise makes that
# rank raise when it starts optimizer step <step> (1-based); <rank>:<step>:nan makes its LM loss NaN in that step's
# first micro batch. They check that one failing rank ends the whole job, and that one rank's NaN skips the update
# on every rank.
FAULT_ENV = "DEEPSEEK_VL2_LORA_FAULT"


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
    BenchmarkError,
    RunLockError,
)


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


# ------------------------------------------------------------------------------------------------ the loop
def train(cfg, run_dir: str | Path) -> TrainResult:
    """Train as `cfg` (a composed TrainConfig) says, writing everything under `run_dir`."""
    cfg = as_train_config(cfg)
    check_config(cfg)
    apply_init_from(cfg)  # model.init_from: its policy replaces cfg.policy, before anything reads it
    if cfg.trainer.dry_run:
        raise ConfigError("trainer.dry_run=true plans memory instead of training: deepseek_vl2_lora.plan's dry_run")
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


def _train_stream(run: _Run):
    """(epoch, global batch index, collated micro batch) from the run's data position on (`batching.Batching`); a
    sample gone bad since validation is replaced, or left out of its packed row (skip), or comes back as one error
    line (`SkipBadSamples`)."""
    cfg, data = run.cfg, run.data
    return data.batching.stream(
        SkipBadSamples(data.train_set, cfg.data.on_bad_sample),
        CollateItems(data.collator, cfg.data.on_bad_sample),
        run.state.epoch,
        run.state.batch,
        num_workers=cfg.data.num_workers,
        pin_memory=run.device.type == "cuda",
        rank=run.env.rank,
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
        state.advance(epoch, index, data.batching.per_epoch(epoch))
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
            per_epoch = run.data.batching.per_epoch(state.epoch)
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
