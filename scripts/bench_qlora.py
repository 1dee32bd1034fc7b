#!/usr/bin/env python
"""QLoRA benchmark: one VL2-Small-width training step on a 4-bit (nf4) frozen base against the same step on the bf16
base: the measured peak memory against the dry-run plan's, and the step time.

    python scripts/bench_qlora.py                                  # GPU: 4 LM layers, the whole vision tower
    python scripts/bench_qlora.py --layers 1 --vision-layers 1 --length 1536 --steps 2 --warmup 1  # a CPU check

The model is the released VL2-Small config cut to `--layers` decoder layers (layer 0 dense, the rest MoE with 64
routed experts; full width), random weights, the experiment's policy (`mla_lowrank`: the MLA low-rank paths
trained in full, everything else frozen), micro batch `--micro-batch` × `--length` tokens with one 2×2-tiled image
per sample, uniform routing (the plan's assumption), recompute on unless `--no-recompute`. On a GPU: bf16 storage
and autocast, the grouped expert GEMM; on the CPU: the CPU kernels in `--precision` (the plan then plans the CPU step).
Each quantization runs in turn on a fresh model: the planned peak (`FakeTrainingModel`, the dry run's step), the
measured one (`torch.cuda.max_memory_allocated`; on the CPU the profiler's allocator events) and the median step
time over `--steps` after `--warmup`. Results: a table, and JSON with `--out`.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

GIB = 2**30


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=4, help="decoder layers (VL2-Small has 27)")
    ap.add_argument("--vision-layers", type=int, default=27, help="SigLIP layers (27 in the release)")
    ap.add_argument("--micro-batch", type=int, default=1)
    ap.add_argument("--length", type=int, default=4096, help="tokens per sample")
    ap.add_argument("--no-recompute", action="store_true")
    ap.add_argument("--quantize", nargs="+", default=["none", "nf4"], choices=["none", "nf4", "int8"])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"], help="auto: bf16 on CUDA")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", help="write the results here (JSON)")
    return ap.parse_args(argv)


def slice_dir(out: Path, layers: int, vision_layers: int) -> Path:
    """The released VL2-Small config.json, cut to `layers` decoder and `vision_layers` SigLIP layers."""
    from deepseek_vl2_lora.plan.planner import RELEASED_DIR

    raw = json.loads((RELEASED_DIR / "deepseek-vl2-small" / "config.json").read_text())
    raw["language_config"]["num_hidden_layers"] = layers
    raw["vision_config"]["layers"] = vision_layers
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(raw))
    return out


def random_model(cfg, vl2, device: torch.device, dtype: torch.dtype):
    """Random weights in `dtype` on `device` (norms 1, biases 0), the frozen LM weights then quantized as
    `cfg.model.quantize` says (as from_pretrained stores them)."""
    from deepseek_vl2_lora.model import DeepseekVL2ForCausalLM
    from deepseek_vl2_lora.model.quant import quantize_modules_
    from deepseek_vl2_lora.policy.quantize import keep_unquantized

    with torch.device("meta"):
        model = DeepseekVL2ForCausalLM(
            vl2, attn_implementation=cfg.model.attn_implementation, experts_kernel=cfg.model.experts_kernel
        ).to(dtype)
    model = model.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.fill_(1.0)
            elif name.endswith("bias"):  # e_score_correction_bias included (the official code leaves it empty)
                p.zero_()
            else:
                p.normal_(0.0, 0.02, generator=gen)
    for module in model.modules():
        if hasattr(module, "reset_inv_freq"):
            module.reset_inv_freq(device)
    keep = keep_unquantized(cfg.policy, vl2.language.use_mla)
    quantize_modules_(model, cfg.model.quantize, keep, cfg.model.quantize_lm_head)
    return model


def measured_peak(step, device: torch.device) -> int:
    """Peak bytes allocated while `step()` runs, on top of what was live before it: CUDA's own counter, or the sum
    of the CPU profiler's allocation events."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    live = peak = 0
    for event in sorted(prof.profiler.kineto_results.events(), key=lambda e: e.start_ns()):
        if event.name() == "[memory]":
            live += event.nbytes()
            peak = max(peak, live)
    return peak


def live_bytes(model, engine, batch) -> int:
    """Bytes held before a step: weights, buffers, optimizer state, the batch (one count per storage)."""
    state = [t for s in engine.optimizer.state.values() for t in s.values() if torch.is_tensor(t) and t.dim()]
    tensors = [*model.parameters(), *model.buffers(), *state, *(v for v in batch.values() if torch.is_tensor(v))]
    return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.values())


def run(quantize: str, args, model_dir: Path, device: torch.device) -> dict:
    from deepseek_vl2_lora.eval import default_config
    from deepseek_vl2_lora.plan.batch import synthetic_batch
    from deepseek_vl2_lora.plan.fake import assume_routing
    from deepseek_vl2_lora.plan.measure import FakeTrainingModel
    from deepseek_vl2_lora.plan.planner import model_config_for
    from deepseek_vl2_lora.policy.groups import optimizer_param_groups
    from deepseek_vl2_lora.training.dist_env import DistEnv
    from deepseek_vl2_lora.training.engine import SingleProcessEngine
    from deepseek_vl2_lora.training.step import autocast_for, micro_step, prepare_model, resolve_precision

    precision = "bf16" if args.precision == "auto" and device.type == "cuda" else args.precision
    precision = resolve_precision(precision, device)
    recompute = "none" if args.no_recompute else "full"  # a trainer.recompute setting
    cfg = default_config(
        [
            "experiment=vl2_small",
            f"model.path={model_dir}",
            f"model.quantize={quantize}",
            f"trainer.precision={precision}",
            f"trainer.micro_batch_size={args.micro_batch}",
            "trainer.grad_accum=1",
            f"trainer.recompute={recompute}",
            f"data.max_length={args.length}",
        ]
    )
    vl2, _ = model_config_for(cfg.model)
    target = "cuda" if device.type == "cuda" else "cpu"
    planned = FakeTrainingModel(cfg, vl2, target=target).measure(args.micro_batch, recompute).peak.total
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    model = random_model(cfg, vl2, device, dtype)
    prepare_model(model, cfg.policy, cfg.trainer, compile_layers=False)
    groups = optimizer_param_groups(model, cfg.policy, lr=cfg.optim.lr)
    engine = SingleProcessEngine(model, groups, cfg.optim, args.steps + args.warmup + 2, DistEnv())
    batch = synthetic_batch(vl2, args.micro_batch, args.length, cfg.plan, None)
    autocast = autocast_for(precision, device)

    def step():
        micro_step(engine, batch, device, autocast)
        engine.optimizer_step(cfg.optim.grad_clip, True)

    with assume_routing(model, 0.0):
        step()  # allocates the optimizer state, as every later step finds it
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
        before = live_bytes(model, engine, batch)
        peak = measured_peak(step, device)
        peak = peak if device.type == "cuda" else before + peak
        times = []
        for i in range(args.warmup + args.steps):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i >= args.warmup:
                times.append(time.perf_counter() - t0)
    seconds = statistics.median(times)
    return {
        "quantize": quantize,
        "planned_peak_gib": planned / GIB,
        "measured_peak_gib": peak / GIB,
        "plan_error": planned / peak - 1,
        "step_s": seconds,
        "tokens_per_s": args.micro_batch * args.length / seconds,
    }


def main(argv=None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory(prefix="bench_qlora-") as tmp:
        model_dir = slice_dir(Path(tmp) / "deepseek-vl2-small-slice", args.layers, args.vision_layers)
        rows = []
        for q in args.quantize:
            rows.append(run(q, args, model_dir, device))
            gc.collect()  # the previous model's memory back before the next one is built
            if device.type == "cuda":
                torch.cuda.empty_cache()
    base = next((r for r in rows if r["quantize"] == "none"), None)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(
        f"VL2-Small width, {args.layers} LM + {args.vision_layers} vision layers, micro batch {args.micro_batch} × "
        f"{args.length} tokens, recompute {'off' if args.no_recompute else 'on'}, {name}, torch {torch.__version__}"
    )
    print(f"{'base':6} {'plan GiB':>9} {'peak GiB':>9} {'plan err':>9} {'step s':>8} {'tok/s':>8} {'time × bf16':>12}")
    for r in rows:
        ratio = f"{r['step_s'] / base['step_s']:.2f}" if base else "-"
        print(
            f"{r['quantize']:6} {r['planned_peak_gib']:9.2f} {r['measured_peak_gib']:9.2f} {r['plan_error']:+9.1%} "
            f"{r['step_s']:8.3f} {r['tokens_per_s']:8.0f} {ratio:>12}"
        )
    if args.out:
        record = {"args": vars(args), "device": name, "torch": torch.__version__, "rows": rows}
        Path(args.out).write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
