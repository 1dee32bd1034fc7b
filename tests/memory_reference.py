"""The independent side of the memory-plan tests: the same training step run for real, its peak measured by
PyTorch's own allocator tracking (the profiler's memory events on the CPU, `max_memory_allocated` on CUDA).

The step is the one the plan runs (prepare_model, the planned batch and routing assumption, micro_step, the
engine's optimizer step, optimizer state present from a first update); only the tensors are real."""

from __future__ import annotations

import json
from contextlib import nullcontext
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from torch.profiler import ProfilerActivity, profile

from deepseek_vl2_lora.model import DeepseekVL2ForCausalLM, VL2Config
from deepseek_vl2_lora.model.quant import quantize_modules_, quantized_weights
from deepseek_vl2_lora.plan.batch import plan_batch
from deepseek_vl2_lora.plan.fake import assume_routing
from deepseek_vl2_lora.policy.groups import optimizer_param_groups
from deepseek_vl2_lora.policy.quantize import keep_unquantized
from deepseek_vl2_lora.training.batching import micro_batch_of
from deepseek_vl2_lora.training.config import as_train_config
from deepseek_vl2_lora.training.dist_env import DistEnv
from deepseek_vl2_lora.training.engine import SingleProcessEngine
from deepseek_vl2_lora.training.step import micro_step, prepare_model

CONFIGS = Path(__file__).resolve().parent.parent / "deepseek_vl2_lora" / "configs"
RELEASED = Path(__file__).resolve().parent.parent / "deepseek_vl2_lora" / "assets" / "released"


def compose_config(*overrides: str):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return as_train_config(compose("train", overrides=list(overrides)))


def write_slice(out_dir: Path, released: str, lm_layers: int = 2, vision_layers: int = 2) -> Path:
    """A released config.json cut to a few layers, at full width (its shapes are the real ones)."""
    raw = json.loads((RELEASED / released / "config.json").read_text())
    raw["language_config"]["num_hidden_layers"] = lm_layers
    raw["vision_config"]["layers"] = vision_layers
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps(raw))
    return out_dir


def real_model(vl2_config: VL2Config, cfg, device="cpu", dtype=torch.float32) -> DeepseekVL2ForCausalLM:
    """Uninitialised real weights (values do not change memory; routing is the plan's assumption). Under
    `model.quantize` the quantized storage is zeroed instead (weights 0: finite, and nothing to quantize)."""
    with torch.device("meta"):
        model = DeepseekVL2ForCausalLM(
            vl2_config, attn_implementation=cfg.model.attn_implementation, experts_kernel=cfg.model.experts_kernel
        ).to(dtype)
        keep = keep_unquantized(cfg.policy, vl2_config.language.use_mla)
        quantize_modules_(model, cfg.model.quantize, keep, cfg.model.quantize_lm_head)
    model = model.to_empty(device=device)
    for q in quantized_weights(model).values():
        for b in q.buffers():
            b.zero_()
    for m in model.modules():
        if hasattr(m, "reset_inv_freq"):
            m.reset_inv_freq(device=device)
    return model


def _live_bytes(tensors) -> int:
    seen = {}
    for t in tensors:
        st = t.untyped_storage()
        seen[st.data_ptr()] = st.nbytes()
    return sum(seen.values())


def measure_real_step(cfg, model, device="cpu", autocast=nullcontext, around_step=nullcontext) -> int:
    """Peak bytes of one steady-state training step (weights, optimizer state and batch included). `around_step`:
    a context entered around the step alone (e.g. to watch resident memory)."""
    tc = cfg.trainer
    prepare_model(model, cfg.policy, cfg.trainer, compile_layers=False)
    groups = optimizer_param_groups(model, cfg.policy, lr=cfg.optim.lr)
    engine = SingleProcessEngine(model, groups, cfg.optim, 10, DistEnv())
    for p in engine.params:
        p.grad = torch.zeros_like(p)
    engine.optimizer.step()
    engine.zero_grad()
    batch = plan_batch(model.config, micro_batch_of(cfg.data, tc), cfg.data, tc, cfg.plan)
    batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    state = [t for s in engine.optimizer.state.values() for t in s.values() if t.dim() > 0]
    tensors = list(model.parameters()) + list(model.buffers()) + state
    base = _live_bytes(tensors + [v for v in batch.values() if isinstance(v, torch.Tensor)])
    n = min(tc.grad_accum, 2)
    skew = cfg.plan.zipf_exponent if cfg.plan.routing == "zipf" else 0.0

    def step():
        for i in range(n):
            micro_step(engine, batch, torch.device(device), autocast, 1.0, n, i == n - 1)
        engine.optimizer_step(cfg.optim.grad_clip, True)

    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        with assume_routing(model, skew):
            step()
        return torch.cuda.max_memory_allocated()
    with assume_routing(model, skew), around_step():
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            step()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    running = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        running += e.nbytes()
        peak = max(peak, running)
    return base + peak
