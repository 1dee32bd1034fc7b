#!/usr/bin/env python
"""Training-step benchmark: an official-style reference path vs our optimized path, same model, same batch.

    python scripts/bench.py                          # VL2-Small LM shapes, 8k tokens/step, uniform + skewed router
    python scripts/bench.py --shapes tiny            # VL2-Tiny shapes (MHA) with images
    python scripts/bench.py --paths all              # also each optimization reverted / added on its own
    python scripts/bench.py --sample-tokens 1024     # rows packed with ~1k-token samples (per-sample attention)
    python scripts/bench.py --shapes cpu-tiny --steps 3 --warmup 1   # a CPU smoke run of the whole script

Paths (toggled on one model, so all see identical weights and batch):
- reference: per-expert loop MoE, the official absorbed eager MLA (or eager MHA), full fp32 logits + CE;
  whole-layer recompute only if the step would otherwise run out of memory (recorded as `recompute`);
- optimized: grouped-GEMM experts (`torch._grouped_mm` where it has a kernel), non-absorbed MLA on SDPA's
  fused kernels (`flash_attention_2` on CUDA: cuDNN at 192/128, else flash with V padded; packed rows: one fused
  call per sample), loss on supervised positions without full-vocab logits, recompute as for the reference;
- ablations (`--paths all`): the optimized path with one technique reverted (`-grouped`: loop experts,
  `-fused_attention`: eager attention, `-lean_ce`: full fp32 logits) or added (`+recompute`: whole layers,
  `+selective`: trainer.recompute=selective, `+compile`: each decoder layer torch.compiled, `+feature_cache`:
  frozen-vision features from the disk cache, image shapes only).
All train the MLA low-rank paths (`mla_lowrank`; `mha_lora` for the MHA tiny shapes) with AdamW on the trainable
parameters kept in fp32; vision is frozen and runs without autograd.

Reported per path: median step time over --steps after --warmup, LM tokens/s, useful TFLOP/s, peak memory;
then the speedups and an agreement check of reference vs optimized (loss and trainable gradients, same weights,
same batch). FLOP rule (deepseek_vl2_lora.training.metrics.FlopModel, the one the trainer logs): per LM token
4·N_active + 2·N_trainable, plus 3·A for attention, where N_active counts the matmul weights a token passes
through (attention projections, dense or shared + top-k routed experts, router, lm_head; not the embedding) and
A = 2·H·(d_qk + d_v) per (query, visible key) pair of each sample; frozen vision adds its forward FLOPs per tile.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time

import torch

from deepseek_vl2_lora.model.tiny import FAMILIES

SHAPES = {
    # VL2-Small language model (= DeepSeek-V2-Lite dims); a token vision tower (LM-only batches).
    "small": {
        "vision": {"width": 64, "layers": 1, "heads": 4, "mlp_ratio": 3.7362, "patch_size": 14, "image_size": 384},
        "language": {
            "hidden_size": 2048,
            "num_hidden_layers": 27,
            "num_attention_heads": 16,
            "num_key_value_heads": 16,
            "use_mla": True,
            "q_lora_rank": None,
            "kv_lora_rank": 512,
            "qk_nope_head_dim": 128,
            "qk_rope_head_dim": 64,
            "v_head_dim": 128,
            "intermediate_size": 10944,
            "moe_intermediate_size": 1408,
            "n_routed_experts": 64,
            "n_shared_experts": 2,
            "num_experts_per_tok": 6,
            "first_k_dense_replace": 1,
            "topk_method": "greedy",
            "vocab_size": 102400,
            "max_position_embeddings": 8192,
        },
        "policy": "mla_lowrank",
        "images": False,
    },
    # VL2-Tiny with its SigLIP-SO400M tower and images (MHA: trains q/k/v/o LoRA).
    "tiny": {
        "vision": {"width": 1152, "layers": 27, "heads": 16, "mlp_ratio": 3.7362, "patch_size": 14, "image_size": 384},
        "language": {
            "hidden_size": 1280,
            "num_hidden_layers": 12,
            "num_attention_heads": 10,
            "num_key_value_heads": 10,
            "use_mla": False,
            "q_lora_rank": None,
            "kv_lora_rank": None,
            "qk_nope_head_dim": 0,
            "qk_rope_head_dim": 0,
            "v_head_dim": 0,
            "intermediate_size": 6848,
            "moe_intermediate_size": 896,
            "n_routed_experts": 64,
            "n_shared_experts": 2,
            "num_experts_per_tok": 6,
            "first_k_dense_replace": 1,
            "topk_method": "greedy",
            "vocab_size": 129280,
            "max_position_embeddings": 8192,
        },
        "policy": "mha_lora",
        "images": True,
    },
    # The small-mla tiny family (deepseek_vl2_lora/model/tiny.py): runs on a CPU in seconds, a check of the script.
    "cpu-tiny": {
        "vision": {**FAMILIES["small-mla"]["vision"], "image_size": 64, "patch_size": 16},
        "language": {**FAMILIES["small-mla"]["language"], "vocab_size": 512},
        "policy": "mla_lowrank",
        "images": True,
    },
}


def build(shapes: dict, device, dtype):
    from deepseek_vl2_lora.model import DeepseekVL2ForCausalLM, VL2Config

    v, lm = shapes["vision"], shapes["language"]
    raw = {
        "tile_tag": "2D",
        "global_view_pos": "head",
        "candidate_resolutions": [[v["image_size"]] * 2],
        "vision_config": v,
        "projector_config": {"n_embed": lm["hidden_size"], "input_dim": v["width"]},
        "language_config": lm,
    }
    with torch.device(device):
        model = DeepseekVL2ForCausalLM(VL2Config.from_dict(raw, source="bench shapes"), attn_implementation="eager")
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.fill_(1.0)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.normal_(0.0, 0.02 if "gate.weight" not in name else 0.1, generator=gen)
    for mod in model.modules():  # buffers were made on `device`; RoPE frequencies stay fp32
        if hasattr(mod, "inv_freq"):
            mod.reset_inv_freq(device)
    return model.to(dtype)


def skew_routing(model, zipf_s: float = 0.5, seed: int = 0) -> None:
    """Realistic imbalance. Random gates route almost uniformly; trained ones do not. Here every MoE layer routes
    by a fixed Zipf(s) popularity over its experts (∝ 1/rank^s, ranks shuffled per layer): each token's k
    distinct experts are drawn from it once per layer and batch shape, so every path sees the same routing. The
    gate still runs and its top-k weights scale the chosen experts, so the router trains as usual.
    With 64 experts, top-6 and s = 0.5 the busiest expert gets ~3.8× the mean load and the idlest ~0.55×."""
    from deepseek_vl2_lora.model.moe import Router

    chosen = {}

    def hook(mod, args, out):
        idx, weight, aux = out
        key = (id(mod), tuple(idx.shape))
        if key not in chosen:
            g = torch.Generator().manual_seed(seed + len(chosen))
            rank = torch.randperm(mod.n_experts, generator=g).float() + 1
            popularity = rank.pow(-zipf_s).expand(idx.shape[0], -1)
            picks = torch.multinomial(popularity, idx.shape[1], replacement=False, generator=g)
            chosen[key] = picks.to(idx.device, idx.dtype)
        return chosen[key], weight, aux

    for m in model.modules():
        if isinstance(m, Router):
            m.register_forward_hook(hook)


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


def make_batch(shapes, tokens: int, seq: int, supervised: float, device, sample_tokens=None, images_per_row=2):
    """`tokens // seq` rows of `seq` random tokens. Image shapes: `images_per_row` 2×2-tiled images at the start
    of each row, their positions unsupervised. With `sample_tokens`, each row is packed with samples of 0.5–1.5×
    that length (`segment_ids`; the first sample holds the images)."""
    b = max(1, tokens // seq)
    g = torch.Generator().manual_seed(1)
    vocab = shapes["language"]["vocab_size"]
    ids = torch.randint(3, vocab, (b, seq), generator=g)
    labels = ids.clone()
    labels[:, : int(seq * (1 - supervised))] = -100
    batch = {"input_ids": ids, "attention_mask": torch.ones(b, seq, dtype=torch.long), "labels": labels}
    images_end = 0
    if shapes["images"]:
        v = shapes["vision"]
        side = -(-(v["image_size"] // v["patch_size"]) // 2)
        tw = th = 2
        n_img = side * (side + 1) + 1 + (side * th) * (side * tw + 1)  # official 2D layout, 2×2 tiles
        images_end = 1 + images_per_row * (n_img + 1)
        if images_end > seq:
            raise SystemExit(f"{images_per_row} images of {n_img} tokens do not fit a row of {seq}")
        mask = torch.zeros(b, seq, dtype=torch.bool)
        for i in range(images_per_row):
            start = 1 + i * (n_img + 1)
            mask[:, start : start + n_img] = True
        batch["labels"][mask] = -100
        n_tiles = images_per_row * (1 + tw * th)
        batch.update(
            images=torch.randn(b, n_tiles, 3, v["image_size"], v["image_size"], generator=g),
            images_seq_mask=mask,
            images_spatial_crop=torch.tensor([[tw, th]] * images_per_row).expand(b, -1, -1).contiguous(),
        )
    if sample_tokens:
        seg = torch.zeros(b, seq, dtype=torch.long)
        for r in range(b):
            start, j = 0, 1
            while start < seq:
                n = int(torch.randint(sample_tokens // 2, sample_tokens * 3 // 2 + 1, (), generator=g))
                n = max(n, images_end) if j == 1 else n  # the images belong to the first sample
                seg[r, start : start + n] = j
                start, j = start + n, j + 1
        batch["segment_ids"] = seg
    return {k: t.to(device) for k, t in batch.items()}


def set_path(model, path: dict, device, cache_dir=None) -> None:
    from deepseek_vl2_lora.model.attention import MLAttention
    from deepseek_vl2_lora.model.moe import RoutedExperts, grouped_mm_supported

    probe = torch.zeros(1, dtype=model.dtype, device=device)
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
        return "n/a (cpu)"
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


def run_path(model, batch, path, steps, warmup, device, tile_keys=None):
    """(median step seconds, peak GiB, the recompute setting it ran with: none | selective | full)."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, fused=device.type == "cuda")
    extra = {"tile_keys": tile_keys} if path.get("cache") else {}
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    i = 0
    while i < warmup + steps:
        t0 = time.perf_counter()
        oom = False
        try:
            out = model(**batch, **extra, return_logits=not path["lean_ce"])
            (out.loss + (out.aux_loss if out.aux_loss is not None else 0)).backward()
        except torch.OutOfMemoryError:
            if path["recompute"] != "auto" or model.language.model.gradient_checkpointing:
                raise
            oom = True  # handled below, once the exception (and the activations its frames hold) is gone
        if oom:
            out = None
            model.zero_grad(set_to_none=True)
            gc.collect()
            torch.cuda.empty_cache()
            print("  out of memory without recompute: retrying with whole-layer recompute", flush=True)
            model.language.model.gradient_checkpointing = True
            torch.cuda.reset_peak_memory_stats(device)
            continue
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
        i += 1
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return statistics.median(times), peak, model.language.model.recompute


def agreement(model, batch, device):
    """Loss and trainable gradients of the reference and optimized paths (same weights, batch, no step)."""
    results = {}
    for name in ("reference", "optimized"):
        path = dict(PATHS[name], recompute=True)  # recompute changes no value; it keeps the reference in memory
        set_path(model, path, device)
        model.zero_grad(set_to_none=True)
        out = model(**batch, return_logits=not path["lean_ce"])
        (out.loss + (out.aux_loss if out.aux_loss is not None else 0)).backward()
        grads = {n: p.grad.float().clone() for n, p in model.named_parameters() if p.requires_grad}
        results[name] = (out.loss.float().item(), grads)
        del out
    model.zero_grad(set_to_none=True)
    (l_ref, g_ref), (l_opt, g_opt) = results["reference"], results["optimized"]
    worst = max(((g_opt[n] - g_ref[n]).norm() / g_ref[n].norm().clamp(min=1e-12)).item() for n in g_ref)
    return {
        "loss_reference": l_ref,
        "loss_optimized": l_opt,
        "loss_rel_diff": abs(l_opt - l_ref) / abs(l_ref),
        "worst_grad_rel_diff": worst,
    }


def expert_imbalance(model, batch) -> float:
    """max/mean tokens per expert, averaged over the MoE layers (1.0 = perfectly balanced)."""
    from deepseek_vl2_lora.model.moe import MoE

    ratios = []

    def hook(mod, args, out):
        counts = torch.bincount(out[0].reshape(-1), minlength=mod.n_experts).float()
        ratios.append((counts.max() / counts.mean()).item())

    handles = [m.gate.register_forward_hook(hook) for m in model.modules() if isinstance(m, MoE)]
    with torch.no_grad():
        model(**batch, return_logits=False)
    for h in handles:
        h.remove()
    return statistics.mean(ratios)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", choices=sorted(SHAPES), default="small")
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
    ap.add_argument("--policy", help="a configs/policy preset instead of the shapes' MLA-path policy")
    ap.add_argument("--expert-lora", type=int, metavar="R", help="also LoRA of rank R on the routed experts")
    ap.add_argument("--out", help="also write the results as JSON here")
    args = ap.parse_args()

    import tempfile

    import yaml

    from deepseek_vl2_lora.data.packing import sample_lengths
    from deepseek_vl2_lora.data.tiling import tile_key
    from deepseek_vl2_lora.policy.groups import apply_policy
    from deepseek_vl2_lora.training.metrics import FlopModel

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    shapes = SHAPES[args.shapes]
    names = list(PATHS) if args.paths == "all" else args.paths.split(",")
    if not shapes["images"]:
        names = [n for n in names if not PATHS[n].get("cache")]
    unknown = [n for n in names if n not in PATHS]
    if unknown:
        raise SystemExit(f"unknown path(s) {unknown}; choose from {', '.join(PATHS)}")
    seq = min(args.seq, args.tokens) if args.shapes != "cpu-tiny" else min(args.seq, 64)
    tokens = args.tokens if args.shapes != "cpu-tiny" else min(args.tokens, 128)
    sample_tokens = args.sample_tokens if args.shapes != "cpu-tiny" or not args.sample_tokens else 16
    images_per_row = args.images_per_row if args.shapes != "cpu-tiny" else 1
    header = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "shapes": args.shapes,
        "tokens_per_step": tokens,
        "seq": seq,
        "sample_tokens": sample_tokens,
        "images_per_row": images_per_row if shapes["images"] else 0,
        "dtype": str(dtype),
        "supervised": args.supervised,
        "policy": args.policy or shapes["policy"],
        "expert_lora_rank": args.expert_lora,
    }
    print(json.dumps(header), flush=True)
    results = []
    cache_root = tempfile.mkdtemp(prefix="bench_feature_cache_")
    for router in ["uniform", "skewed"] if args.router == "both" else [args.router]:
        model = build(shapes, device, dtype)
        policy = yaml.safe_load(open(f"deepseek_vl2_lora/configs/policy/{args.policy or shapes['policy']}.yaml"))
        if args.expert_lora:
            policy["groups"]["routed_experts"] = {"mode": "lora", "r": args.expert_lora, "alpha": 2 * args.expert_lora}
        apply_policy(model, policy)
        for p in model.parameters():  # trainable weights in fp32 (master weights), as the trainer keeps them
            if p.requires_grad:
                p.data = p.data.float()
        model.train()
        if router == "skewed":
            skew_routing(model, args.zipf)
        batch = make_batch(shapes, tokens, seq, args.supervised, device, sample_tokens, images_per_row)
        tile_keys = [[tile_key(t) for t in row] for row in batch["images"]] if shapes["images"] else None
        n_tokens = int(batch["attention_mask"].sum())
        flops = FlopModel.from_model(model).batch_flops(batch)
        row = {
            "router": router,
            "samples": len(sample_lengths(batch)),
            "attention_kernel": attention_kernel(model, device),
            "expert_imbalance": expert_imbalance(model, batch),
        }
        if "reference" in names and "optimized" in names:
            row.update(agreement(model, batch, device))
        for name in names:
            set_path(model, PATHS[name], device, cache_root)
            step, peak, recompute = run_path(model, batch, PATHS[name], args.steps, args.warmup, device, tile_keys)
            row[name] = {
                "step_s": step,
                "tokens_per_s": n_tokens / step,
                "tflops": flops / step / 1e12,
                "peak_gib": peak,
                "recompute": recompute == "full",  # whole layers (as before trainer.recompute existed)
                "recompute_setting": recompute,  # none | selective | full
            }
            print(
                f"[{router}] {name:26s} step {step * 1e3:9.1f} ms  {n_tokens / step:10.0f} tok/s  "
                f"{flops / step / 1e12:7.1f} TFLOP/s  peak {peak if peak is None else round(peak, 2)} GiB"
                + {"full": "  (whole-layer recompute)", "selective": "  (selective recompute)"}.get(recompute, ""),
                flush=True,
            )
        if "reference" in row and "optimized" in row:
            row["speedup"] = row["reference"]["step_s"] / row["optimized"]["step_s"]
            print(
                f"[{router}] speedup {row['speedup']:.2f}x  imbalance {row['expert_imbalance']:.2f}  "
                f"loss rel diff {row['loss_rel_diff']:.2e}  worst grad rel diff {row['worst_grad_rel_diff']:.2e}  "
                f"attention kernel {row['attention_kernel']}",
                flush=True,
            )
        if "optimized" in row:
            for name in names:
                if name.startswith("optimized") and name != "optimized":
                    rel = row[name]["step_s"] / row["optimized"]["step_s"]
                    print(f"[{router}] {name}: {rel:.2f}x the optimized step time", flush=True)
        results.append(row)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print(json.dumps({**header, "results": results}))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({**header, "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
