"""One training step of the full-size model on fake tensors, measured: the peak, what it is made of and when.

The step is the training loop's own (`step.prepare_model`, `step.micro_step`, the engine's optimizer step):
the policy is applied exactly as training applies it (PEFT adapters included), with the configured precision,
recompute (none, selective, full), experts kernel, attention backend and packing. The optimizer state exists
before the measured step (its first step allocates it; every later step starts with it), and with gradient
accumulation two micro batches run, so gradients already exist during the second one: the measured step is a
steady-state step.
"""

from __future__ import annotations

from contextlib import ExitStack, nullcontext
from dataclasses import dataclass

import torch

from ..data.packing import sample_lengths
from ..model.deepseek_vl2 import DeepseekVL2ForCausalLM
from ..model.quant import quantize_modules_
from ..policy.groups import optimizer_param_groups
from ..policy.quantize import keep_unquantized
from ..training.dist_env import DistEnv
from ..training.engine import SingleProcessEngine
from ..training.metrics import FlopModel
from ..training.step import micro_step, prepare_model, resolve_dtype, resolve_precision
from .batch import plan_batch, planned_length, sample_layout
from .fake import ATTENTION_KERNELS, CudaAttentionKernels, HostValues, assume_routing, fake_mode
from .tracker import CUDA_BLOCK, MemoryTracker, Snapshot
from .zero import ParamCounts, param_counts


@dataclass
class Setting:
    """How the step runs: what the config says, resolved for the target device."""

    target: str  # "cuda" (a Hopper GPU, bf16) or "cpu" (this machine's kernels, for checking against real runs)
    precision: str  # bf16 | fp32
    dtype: torch.dtype  # storage of frozen weights
    attn_implementation: str
    experts_kernel: str
    notes: list[str]


def resolve_setting(model_cfg, trainer_cfg, target: str = "cuda") -> Setting:
    """The trainer's resolution of precision, storage dtype and kernels, for a `target` device."""
    device = torch.device(target)
    notes = []
    if target == "cuda" and trainer_cfg.precision == "auto":
        precision = "bf16"  # auto on a GPU with bf16 (every GPU the plan is for); this process may have no CUDA
    else:
        precision = resolve_precision(trainer_cfg.precision, device)
    dtype = resolve_dtype(model_cfg.dtype, precision, device)  # as the trainer: bf16 storage only on CUDA
    attn = model_cfg.attn_implementation
    if target == "cuda" and attn.endswith("flash_attention_2"):
        # Without flash-attn, flash_attention_2 runs SDPA restricted to its fused kernels: the same kernels (and
        # memory) the sdpa path gets on an H100; this process has no CUDA, so the step runs the sdpa code path.
        attn = attn.replace("flash_attention_2", "sdpa")
        notes.append("flash_attention_2 planned as the fused SDPA kernels it runs on an H100 (no flash-attn)")
    kernel = model_cfg.experts_kernel
    if kernel == "auto":
        kernel = "grouped" if target == "cuda" and precision == "bf16" else "loop"  # what `auto` picks on Hopper
    if trainer_cfg.compile_blocks:
        notes.append("trainer.compile_blocks=true planned uncompiled (compiled layers fuse elementwise temporaries)")
    return Setting(target, precision, dtype, attn, kernel, notes)


@dataclass
class StepMeasurement:
    start: int  # bytes live when the step starts (weights, optimizer state, the batch)
    peak: Snapshot  # the step's peak, by category, and when it happened
    peak_transient: Snapshot  # peak activations + temporaries in forward/backward (ZeRO: the same on every rank)
    step_temporaries: int  # peak scratch of the optimizer step (ZeRO: over the rank's shard only)
    attention: list[str]  # kernels that ran (descriptions)
    counts: ParamCounts
    tokens: int  # real tokens per optimizer step on this rank
    samples: int
    flops: float  # model FLOPs per optimizer step on this rank
    layout: dict
    micro_batches_run: int
    positions: int  # token positions per micro batch (padding included): the per-token denominator
    end_of_forward: dict[str, int]  # activation bytes by module kind when backward starts: saved for backward
    layers_per_kind: dict[str, int]  # decoder layers holding each kind: the per-layer denominator
    counted_flops: dict[str, int]  # matmul/attention FLOPs per phase as run (recompute apart), per step


class _PhaseEngine:
    """The engine with the tracker told which phase runs (forward, backward, optimizer step)."""

    def __init__(self, engine, tracker: MemoryTracker):
        self.engine, self.tracker = engine, tracker

    def forward(self, **inputs):
        self.tracker.phase = "forward"
        return self.engine.forward(**inputs)

    def backward(self, loss, last_micro=True):
        self.tracker.phase = "backward"
        self.engine.backward(loss, last_micro)

    def optimizer_step(self, max_norm, loss_finite):
        self.tracker.phase = "optimizer step"
        return self.engine.optimizer_step(max_norm, loss_finite)


class FakeTrainingModel:
    """The full-size model prepared for training on fake tensors, with its engine (built once, stepped with
    several batch shapes and recompute settings)."""

    def __init__(self, cfg, vl2_config, target: str = "cuda", persistence_threshold: int = 100_000):
        self.cfg, self.vl2_config = cfg, vl2_config
        self.setting = resolve_setting(cfg.model, cfg.trainer, target)
        with torch.device("meta"):  # no time or memory spent on an init that nothing reads
            model = DeepseekVL2ForCausalLM(
                vl2_config,
                attn_implementation=self.setting.attn_implementation,
                experts_kernel=self.setting.experts_kernel,
            ).to(self.setting.dtype)
            m = cfg.model  # quantized storage is built empty (never quantized here: nothing has values)
            keep = keep_unquantized(cfg.policy, vl2_config.language.use_mla)
            quantize_modules_(model, m.quantize, keep, m.quantize_lm_head)
            self.report = prepare_model(
                model, cfg.policy, cfg.trainer, compile_layers=False
            )  # PEFT adapters are made on meta too
        self.fake = fake_mode()
        with self.fake:
            model = model.to_empty(device="cpu")
            for module in model.modules():
                if hasattr(module, "reset_inv_freq"):
                    module.reset_inv_freq(device=None)
            groups = optimizer_param_groups(model, cfg.policy, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
            # foreach AdamW, as PyTorch picks for CUDA tensors (its temporaries span all parameters at once)
            self.engine = SingleProcessEngine(
                model, groups, cfg.optim, cfg.trainer.max_steps or 1, DistEnv(), foreach=target == "cuda"
            )
            with HostValues():  # the first step allocates the optimizer state; the measured step starts with it
                for p in self.engine.params:
                    p.grad = torch.zeros_like(p)
                self.engine.optimizer.step()
                self.engine.zero_grad()
        self.model = model
        self.flop_model = FlopModel.from_model(model)
        self.counts = param_counts(model, persistence_threshold)

    def measure(self, micro_batch_size: int, recompute: str) -> StepMeasurement:
        """One steady-state step of `micro_batch_size` samples (token-budget batching: packed rows, each full) at a
        `trainer.recompute` setting (none | selective | full)."""
        cfg, setting = self.cfg, self.setting
        layout = sample_layout(self.vl2_config, planned_length(cfg.data, cfg.trainer), cfg.plan)
        batch = plan_batch(self.vl2_config, micro_batch_size, cfg.data, cfg.trainer, cfg.plan)
        lengths = sample_lengths(batch)
        self.model.language.model.recompute = recompute
        tracker = MemoryTracker(block=CUDA_BLOCK if setting.target == "cuda" else 1)
        kernels = CudaAttentionKernels() if setting.target == "cuda" else nullcontext()
        micro_batches = min(cfg.trainer.grad_accum, 2)
        autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if setting.precision == "bf16" else nullcontext
        engine = _PhaseEngine(self.engine, tracker)
        with self.fake, ExitStack() as stack:
            batch["images"] = self.fake.from_tensor(batch["images"])  # pixels live on the GPU, too large to keep
            tracker.register_module(self.model)
            tracker.register_optimizer(self.engine.optimizer)
            for value in batch.values():
                if isinstance(value, torch.Tensor):
                    tracker.register(value, "activations", kind="batch")
            start = tracker.now.total
            stack.enter_context(HostValues())
            stack.enter_context(tracker)
            stack.enter_context(kernels)
            skew = cfg.plan.zipf_exponent if cfg.plan.routing == "zipf" else 0.0
            stack.enter_context(assume_routing(self.model, skew))
            for micro in range(micro_batches):
                last = micro == micro_batches - 1
                micro_step(engine, batch, torch.device("cpu"), autocast, 1.0, micro_batches, last)
            engine.optimizer_step(cfg.optim.grad_clip, True)
        if setting.target == "cuda":
            attention = sorted(ATTENTION_KERNELS[k] for k in kernels.kernels)
        else:
            attention = [f"{setting.attn_implementation} on the CPU"]
        if setting.attn_implementation.endswith("eager"):
            attention = ["eager attention (keeps the [B, H, L, L] fp32 probabilities for backward)"]
        accum = cfg.trainer.grad_accum
        return StepMeasurement(
            start=start,
            peak=tracker.peak,
            peak_transient=tracker.peak_transient,
            step_temporaries=tracker.peak_step_temporaries,
            attention=attention,
            counts=self.counts,
            tokens=sum(lengths) * accum,
            samples=len(lengths) * accum,
            flops=self.flop_model.batch_flops(batch, lengths) * accum,
            layout=layout,
            micro_batches_run=micro_batches,
            positions=batch["input_ids"].numel(),
            end_of_forward=tracker.end_of_forward,
            layers_per_kind=tracker.layers_per_kind,
            counted_flops={k: v * accum // micro_batches for k, v in tracker.flops.items()},
        )
