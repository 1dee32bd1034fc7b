#!/usr/bin/env python
"""Training-step benchmark: the trainer's own step on an official-style reference path vs our optimized path.

    python scripts/bench.py                          # VL2-Small LM shapes, 8k tokens/step, uniform + skewed router
    python scripts/bench.py --shapes tiny            # VL2-Tiny shapes (MHA) with images
    python scripts/bench.py --paths all              # also each optimization reverted / added on its own
    python scripts/bench.py --sample-tokens 1024     # rows packed with ~1k-token samples (per-sample attention)
    python scripts/bench.py --device cpu --precision bf16 --shapes small --layers 2 --tokens 512 --seq 256
                                                     # GPU shapes at real width, 2 layers, bf16 autocast on a CPU
    python scripts/bench.py --shapes cpu-tiny --steps 3 --warmup 1   # a CPU smoke run of the whole script

The step is the trainer's: the model prepared by `step.prepare_model` (the policy preset, trainable weights as
fp32 masters over bf16 storage), each micro batch through `step.micro_step` under the trainer's autocast
(`step.autocast_for`), and the optimizer step (clip + AdamW + schedule) through `engine.SingleProcessEngine` with
the policy's parameter groups. Paths switch kernels on that one model, so all see identical weights and batch:
- reference: per-expert loop MoE, the official absorbed eager MLA (or eager MHA), full fp32 logits + CE;
  whole-layer recompute only if the step would otherwise run out of memory (recorded as `recompute`);
- optimized: grouped-GEMM experts (`torch._grouped_mm`), non-absorbed MLA on SDPA's fused kernels
  (`flash_attention_2` on CUDA: cuDNN at 192/128, else flash with V padded; packed rows: one fused call per
  sample; `sdpa` on a CPU), loss on supervised positions without full-vocab logits, recompute as above;
- ablations (`--paths all`): the optimized path with one technique reverted (`-grouped`: loop experts,
  `-fused_attention`: eager attention, `-lean_ce`: full fp32 logits) or added (`+recompute`: whole layers,
  `+selective`: trainer.recompute=selective, `+compile`: each decoder layer torch.compiled, `+feature_cache`:
  frozen-vision features from the disk cache, image shapes only).
All train the MLA low-rank paths (`mla_lowrank`; `mha_lora` for the MHA tiny shapes). Weights are random, built in
the storage dtype (bf16 for `--precision bf16`); LoRA B is drawn like the other weights (a LoRA mid-training: at
B = 0 every gradient of A is exactly zero).

Reported per path: median step time over --steps after --warmup, LM tokens/s, useful TFLOP/s, peak memory, and
an agreement block: the path's loss and trainable gradients against fp32 truth (deepseek_vl2_lora.training.agreement).
The truth is the reference path in fp32 on the same weights (the bf16-built model cast to fp32 and back, both
exact; at --agreement-layers layers); each path runs one bf16 micro step on the same batch; per path the median and max
relative gradient error over the trainable tensors and the loss error are printed beside the reference's. A path
passes when its median error ≤ 2 × the reference's + 1e-3; the script exits 1 when one does not. In fp32 the
truth is the fp32 reference path itself, so the check is equality up to rounding.

FLOP rule (deepseek_vl2_lora.training.metrics.FlopModel, the one the trainer logs): per LM token 4·N_active +
2·N_trainable, plus 3·A for attention, where N_active counts the matmul weights a token passes through (attention
projections, dense or shared + top-k routed experts, router, lm_head; not the embedding) and A = 2·H·(d_qk + d_v)
per (query, visible key) pair of each sample; frozen vision adds its forward FLOPs per tile.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import statistics
import sys
import tempfile
import time

import torch
from bench_model import SHAPES, build, image_tokens, make_batch, prepare, route, shapes_at_depth, train_config, unroute

from deepseek_vl2_lora.training import agreement as fp32_truth
from deepseek_vl2_lora.training.metrics import peak_rss_bytes

PATHS = {
    "reference": dict(experts="loop", attention="absorbed", lean_ce=False, recompute="auto"),
    "optimized": dict(experts="grouped", attention="fused", lean_ce=True, recompute="auto"),
    # reverting a memory saving may need recompute to fit: "auto" turns it on only after an out-of-memory
    "optimized-grouped": dict(experts="loop", attention="fused", lean_ce=True, recompute="auto"),
    "optimized-fused_attention": dict(experts="grouped", attention="eager", lean_ce=True, recompute="auto"),
    "optimized-lean_ce": dict(experts="grouped", attention="fused", lean_ce=False, recompute="auto"),
    "optimized+recompute": dict(experts="grouped", attention="fused", lean_ce=True, recompute=True),
    "optimized+selective": dict(experts="grouped", attention="fused", lean_ce=True, recompute="selective"),
    "optimized+feature_cache": dict(experts="grouped", attention="fused", lean_ce=True, recompute=False, cache=True),
    "optimized+compile": dict(experts="grouped", attention="fused", lean_ce=True, recompute=False, compile=True),
}


def set_path(model, path: dict, device, compute_dtype, cache_dir=None) -> None:
    from deepseek_vl2_lora.model.attention import MLAttention
    from deepseek_vl2_lora.model.moe import RoutedExperts, grouped_mm_supported

    probe = torch.zeros(1, dtype=compute_dtype, device=device)
    fused = "flash_attention_2" if device.type == "cuda" else "sdpa"
    for m in model.modules():
        if isinstance(m, RoutedExperts):
            m.kernel = "grouped" if path["experts"] == "grouped" and grouped_mm_supported(probe) else "loop"
        if hasattr(m, "backend") and hasattr(m, "o_proj"):
            m.backend = fused if path["attention"] == "fused" else "eager"
        if isinstance(m, MLAttention):
            m.absorbed_reference = path["attention"] == "absorbed"
    recompute = path["recompute"]  # True: whole layers; "auto": none until out of memory
    model.language.model.recompute = {True: "full", "selective": "selective"}.get(recompute, "none")
    model.feature_cache = None
    if path.get("cache"):
        from deepseek_vl2_lora.training.feature_cache import VisionFeatureCache

        model.feature_cache = VisionFeatureCache(cache_dir, model)
    for layer in model.language.model.layers:
        # nn.Module.compile keeps the compiled forward here; None restores the eager one (for the paths after)
        layer._compiled_call_impl = None
    if path.get("compile"):
        model.language.model.compile_layers()


def attention_kernel(model, device) -> str:
    """Which fused SDPA kernel takes this model's attention shapes (fwd+bwd, causal, bf16), tried in the order
    the flash_attention_2 backend tries them. MLA's 192/128 must not land on the slow mem-efficient kernel."""
    if device.type != "cuda":
        return "n/a (cpu: sdpa)"
    from torch.nn.attention import SDPBackend, sdpa_kernel

    lm = model.config.language
    dq, dv = (lm.q_head_dim, lm.v_head_dim) if lm.use_mla else (lm.mha_head_dim, lm.mha_head_dim)
    q = torch.randn(1, lm.num_attention_heads, 1024, dq, device=device, dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(1, lm.num_attention_heads, 1024, dv, device=device, dtype=torch.bfloat16, requires_grad=True)
    for name, backend in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION)):
        try:
            with sdpa_kernel([backend]):
                torch.nn.functional.scaled_dot_product_attention(q, q, v, is_causal=True).sum().backward()
            return name
        except RuntimeError:
            pass
    return "flash (V padded)" if dq != dv else "none"


def new_engine(model, cfg, max_steps: int):
    """The trainer's one-process engine: AdamW over the policy's parameter groups, clipping, lr schedule."""
    from deepseek_vl2_lora.policy.groups import optimizer_param_groups
    from deepseek_vl2_lora.training.dist_env import DistEnv
    from deepseek_vl2_lora.training.engine import SingleProcessEngine

    groups = optimizer_param_groups(model, cfg.policy, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    return SingleProcessEngine(model, groups, cfg.optim, max_steps, DistEnv())


def run_path(model, cfg, batch, path, steps, warmup, device, autocast):
    """(median step seconds, peak GiB, the recompute setting it ran with (none | selective | full), last LM loss):
    the trainer's step, timed."""
    from deepseek_vl2_lora.training.step import micro_step

    engine = new_engine(model, cfg, warmup + steps)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    i = 0
    while i < warmup + steps:
        t0 = time.perf_counter()
        oom = False
        try:
            loss, _ = micro_step(engine, batch, device, autocast, full_logits=not path["lean_ce"])
        except torch.OutOfMemoryError:
            if path["recompute"] != "auto" or model.language.model.recompute != "none":
                raise
            oom = True  # handled below, once the exception (and the activations its frames hold) is gone
        if oom:
            engine.zero_grad()
            gc.collect()
            torch.cuda.empty_cache()
            print("  out of memory without recompute: retrying with whole-layer recompute", flush=True)
            model.language.model.recompute = "full"
            torch.cuda.reset_peak_memory_stats(device)
            continue
        engine.optimizer_step(cfg.optim.grad_clip, loss_finite=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
        i += 1
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return statistics.median(times), peak, model.language.model.recompute, float(loss)


def path_gradients(model, cfg, batch, device, autocast, full_logits: bool):
    """(LM loss, {trainable name: fp32 gradient}) of one micro step as the trainer runs it; no update."""
    from deepseek_vl2_lora.training.step import micro_step

    engine = new_engine(model, cfg, 1)
    loss, _ = micro_step(engine, batch, device, autocast, full_logits=full_logits)
    grads = {n: p.grad.float().clone() for n, p in model.named_parameters() if p.requires_grad}
    engine.zero_grad()
    return float(loss), grads


def agreement(model, cfg, batch, names, device, precision, cache_dir) -> dict:
    """Each path's loss and trainable gradients against fp32 truth (the module docstring of
    deepseek_vl2_lora.training.agreement): {path: errors}, plus the truth's loss under "truth_loss"."""
    from deepseek_vl2_lora.training.step import autocast_for

    no_retry = lambda p: dict(p, recompute=p["recompute"] if p["recompute"] != "auto" else False)  # noqa: E731
    with fp32_truth.in_fp32(model):  # in an fp32 run: the reference path itself
        set_path(model, no_retry(PATHS["reference"]), device, torch.float32)
        truth_loss, truth = path_gradients(model, cfg, batch, device, autocast_for("fp32", device), True)
    out = {"truth_loss": truth_loss}
    autocast = autocast_for(precision, device)
    compute_dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    for name in names:
        path = no_retry(PATHS[name])
        set_path(model, path, device, compute_dtype, cache_dir)
        loss, grads = path_gradients(model, cfg, batch, device, autocast, not path["lean_ce"])
        errors = fp32_truth.tensor_errors(grads, truth)
        stats = fp32_truth.summarize(errors)
        out[name] = {
            "grad_median": stats["median"],
            "grad_max": stats["max"],
            "grad_worst": stats["worst"],
            "grad_overall": fp32_truth.overall_error(grads, truth),
            "tensors": stats["tensors"],
            "zero_truth_tensors": len(truth) - stats["tensors"],
            "loss": loss,
            "loss_err": abs(loss - truth_loss) / abs(truth_loss),
        }
        del grads
    ref = out["reference"]["grad_median"] if "reference" in out else None
    for name in names:
        out[name]["pass"] = ref is None or fp32_truth.within(out[name]["grad_median"], ref)
    return out


def expert_imbalance(model, batch, device, autocast) -> float | None:
    """max/mean tokens per expert, averaged over the MoE layers (1.0 = perfectly balanced); None without any."""
    from deepseek_vl2_lora.evaluation.eval_set import MODEL_INPUTS
    from deepseek_vl2_lora.model.moe import MoE

    ratios = []

    def hook(mod, args, out):
        counts = torch.bincount(out[0].reshape(-1), minlength=mod.n_experts).float()
        ratios.append((counts.max() / counts.mean()).item())

    handles = [m.gate.register_forward_hook(hook) for m in model.modules() if isinstance(m, MoE)]
    inputs = {k: v.to(device) for k, v in batch.items() if k in MODEL_INPUTS + ("segment_ids",)}
    with torch.no_grad(), autocast():
        model(**inputs, return_logits=False)
    for h in handles:
        h.remove()
    return statistics.mean(ratios) if ratios else None


def print_agreement(router: str, block: dict, names) -> None:
    ref = block.get("reference")
    for name in names:
        a = block[name]
        beside = ""
        if ref and name != "reference":
            beside = f"  (reference {ref['grad_median']:.3g} / {ref['grad_max']:.3g})"
        print(
            f"[{router}] vs fp32 {name:26s} grad err median {a['grad_median']:.3g} max {a['grad_max']:.3g}{beside}"
            f"  loss err {a['loss_err']:.2e}  {'pass' if a['pass'] else 'FAIL'}",
            flush=True,
        )


def versions(device) -> dict:
    return {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", choices=sorted(SHAPES), default="small")
    ap.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available")
    ap.add_argument("--precision", choices=["bf16", "fp32"], help="default: bf16 on cuda, fp32 on cpu")
    ap.add_argument("--layers", type=int, help="decoder layers (widths unchanged; caps the vision tower's too)")
    ap.add_argument("--agreement-layers", type=int, default=4, help="layers of the fp32-truth check (0: none)")
    ap.add_argument("--tokens", type=int, default=8192, help="LM tokens per step")
    ap.add_argument("--seq", type=int, default=4096, help="row length")
    ap.add_argument("--sample-tokens", type=int, help="pack each row with samples of about this many tokens")
    ap.add_argument("--images-per-row", type=int, default=2, help="2×2-tiled images per row (image shapes)")
    ap.add_argument("--supervised", type=float, default=1.0, help="fraction of each row with labels")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--router", choices=["uniform", "skewed", "both"], default="both")
    ap.add_argument("--zipf", type=float, default=0.5, help="skewed router: Zipf exponent of expert popularity")
    ap.add_argument("--paths", default="reference,optimized", help=f"comma list, or all: {', '.join(PATHS)}")
    ap.add_argument("--policy", help="a policy preset (configs/policy/NAME.yaml) instead of the shapes' policy")
    ap.add_argument("--expert-lora", type=int, metavar="R", help="also LoRA of rank R on the routed experts")
    ap.add_argument("--out", help="also write the results as JSON here")
    args = ap.parse_args()

    from deepseek_vl2_lora.data.packing import sample_lengths
    from deepseek_vl2_lora.data.tiling import tile_key
    from deepseek_vl2_lora.training.metrics import FlopModel
    from deepseek_vl2_lora.training.step import autocast_for

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32  # storage: bf16 weights are exact in fp32
    compute_dtype = dtype
    autocast = autocast_for(precision, device)
    shapes = shapes_at_depth(args.shapes, args.layers)
    layers = shapes["language"]["num_hidden_layers"]
    agreement_layers = min(args.agreement_layers, layers)
    names = list(PATHS) if args.paths == "all" else args.paths.split(",")
    unknown = [n for n in names if n not in PATHS]
    if unknown:
        raise SystemExit(f"unknown path(s) {unknown}; choose from {', '.join(PATHS)}")
    cpu_tiny = args.shapes == "cpu-tiny"
    seq = min(args.seq, args.tokens) if not cpu_tiny else min(args.seq, 64)
    tokens = args.tokens if not cpu_tiny else min(args.tokens, 128)
    sample_tokens = 16 if cpu_tiny and args.sample_tokens else args.sample_tokens
    images_per_row = (1 if cpu_tiny else args.images_per_row) if shapes["images"] else 0
    if images_per_row and 1 + images_per_row * (image_tokens(shapes) + 1) > seq:
        fit = max(0, (seq - 1) // (image_tokens(shapes) + 1))
        print(f"note: {images_per_row} images of {image_tokens(shapes)} tokens do not fit a row of {seq}: {fit}")
        images_per_row = fit
    if not images_per_row:
        names = [n for n in names if not PATHS[n].get("cache")]
    policy = args.policy or shapes["policy"]
    header = {
        **versions(device),
        "shapes": args.shapes,
        "precision": precision,
        "weights_dtype": str(dtype),
        "layers": layers,
        "vision_layers": shapes["vision"]["layers"],
        "agreement_layers": agreement_layers,
        "tokens_per_step": tokens,
        "seq": seq,
        "sample_tokens": sample_tokens,
        "images_per_row": images_per_row,
        "supervised": args.supervised,
        "policy": policy,
        "expert_lora_rank": args.expert_lora,
        "agreement_rule": fp32_truth.rule_text() + " (median over the trainable tensors)",
    }
    print(json.dumps(header), flush=True)
    cfg = train_config(policy, args.expert_lora, precision, device)
    batch = make_batch(shapes, tokens, seq, args.supervised, sample_tokens, images_per_row)
    if images_per_row:
        batch["tile_keys"] = [[tile_key(t) for t in row] for row in batch["images"]]
    routers = ["uniform", "skewed"] if args.router == "both" else [args.router]
    cache_root = tempfile.mkdtemp(prefix="bench_feature_cache_")
    rows = {router: {"router": router} for router in routers}

    # Agreement first, on weights no optimizer step has touched.
    model = None
    if agreement_layers:
        short = copy.deepcopy(shapes)  # the same model but for the LM's depth
        short["language"]["num_hidden_layers"] = agreement_layers
        model = build(short, device, dtype)
        prepare(model, cfg, dtype)
        for router in routers:
            hooks = route(model, router, args.zipf)
            block = agreement(model, cfg, batch, names, device, precision, cache_root)
            rows[router]["agreement_truth_loss"] = block.pop("truth_loss")
            rows[router]["agreement"] = block
            print_agreement(router, block, names)
            unroute(hooks)
        if agreement_layers != layers:
            del model
            model = None
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if model is None:
        model = build(shapes, device, dtype)
        prepare(model, cfg, dtype)

    n_tokens = int(batch["attention_mask"].sum())
    flops = FlopModel.from_model(model).batch_flops(batch)
    for router in routers:
        hooks = route(model, router, args.zipf)
        row = rows[router]
        block = row.pop("agreement", {})
        set_path(model, PATHS["optimized"], device, compute_dtype)
        row.update(
            samples=len(sample_lengths(batch)),
            attention_kernel=attention_kernel(model, device),
            expert_imbalance=expert_imbalance(model, batch, device, autocast),
        )
        for name in names:
            set_path(model, PATHS[name], device, compute_dtype, cache_root)
            step, peak, recompute, loss = run_path(
                model, cfg, batch, PATHS[name], args.steps, args.warmup, device, autocast
            )
            row[name] = {
                "loss": loss,
                "step_s": step,
                "tokens_per_s": n_tokens / step,
                "tflops": flops / step / 1e12,
                "peak_gib": peak,
                "recompute": recompute == "full",  # whole layers (as before trainer.recompute existed)
                "recompute_setting": recompute,  # none | selective | full
            }
            if name in block:
                row[name]["agreement"] = block[name]
            print(
                f"[{router}] {name:26s} step {step * 1e3:9.1f} ms  {n_tokens / step:10.0f} tok/s  "
                f"{flops / step / 1e12:7.1f} TFLOP/s  peak {peak if peak is None else round(peak, 2)} GiB"
                + {"full": "  (whole-layer recompute)", "selective": "  (selective recompute)"}.get(recompute, ""),
                flush=True,
            )
        if "reference" in row and "optimized" in row:
            row["speedup"] = row["reference"]["step_s"] / row["optimized"]["step_s"]
            imbalance = row["expert_imbalance"]
            imbalance = "n/a (no MoE layer)" if imbalance is None else f"{imbalance:.2f}"
            print(
                f"[{router}] speedup {row['speedup']:.2f}x  imbalance {imbalance}  "
                f"attention kernel {row['attention_kernel']}",
                flush=True,
            )
        if "optimized" in row:
            for name in names:
                if name.startswith("optimized") and name != "optimized":
                    rel = row[name]["step_s"] / row["optimized"]["step_s"]
                    print(f"[{router}] {name}: {rel:.2f}x the optimized step time", flush=True)
        unroute(hooks)
    del model
    results = list(rows.values())
    failed = [f"{r['router']}/{n}" for r in results for n in names if not r[n].get("agreement", {}).get("pass", True)]
    summary = {**header, "results": results, "agreement_failures": failed}
    if device.type == "cpu":
        summary["max_rss_gib"] = peak_rss_bytes() / 2**30
    print(json.dumps(summary))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(summary, f, indent=2)
    if failed:
        print(f"agreement FAILED for {', '.join(failed)}: {fp32_truth.rule_text()}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
