#!/usr/bin/env python
"""Training-step benchmark: an official-style reference path vs our optimized path, same model, same batch.

    python scripts/bench.py                          # VL2-Small LM shapes, 8k tokens/step, uniform + skewed router
    python scripts/bench.py --shapes tiny            # VL2-Tiny shapes (MHA) with images
    python scripts/bench.py --shapes cpu-tiny --steps 3 --warmup 1   # a CPU smoke run of the whole script

Paths (toggled on one model, so both see identical weights and batch):
- reference: per-expert loop MoE, the official absorbed eager MLA (or eager MHA), full fp32 logits + CE;
- optimized: grouped-GEMM experts (`torch._grouped_mm` where it has a kernel), non-absorbed MLA on SDPA's
  fused kernels (`flash_attention_2` on CUDA: cuDNN at 192/128, else flash with V padded), loss on supervised
  positions without full-vocab logits.
Both train the MLA low-rank paths (`mla_lowrank`; `mha_lora` for the MHA tiny shapes), AdamW on the trainable
parameters, frozen vision without autograd.

Reported per path: median step time over --steps after --warmup, LM tokens/s, useful TFLOP/s, peak memory;
then the speedup and an agreement check (loss and trainable gradients, first step, same batch).
FLOP rule (useful work, per token): 4·N_active + 2·N_trainable + 3·A, where N_active counts the matmul
parameters a token passes through (attention projections, dense or shared + top-k routed experts, router,
lm_head; not the embedding), N_trainable the trained ones, and A = H·S·(d_qk + d_v) the causal attention
forward FLOPs per token (S = sequence length; mean key count S/2, 2 FLOPs per multiply-add). Vision FLOPs are
not counted (frozen, forward-only).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from deepseek_vl2_lora.tiny import FAMILIES

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
    # The small-mla tiny family (deepseek_vl2_lora/tiny.py): runs on a CPU in seconds, a check of the script.
    "cpu-tiny": {
        "vision": {**FAMILIES["small-mla"]["vision"], "image_size": 64, "patch_size": 16},
        "language": {**FAMILIES["small-mla"]["language"], "vocab_size": 512},
        "policy": "mla_lowrank",
        "images": True,
    },
}


def build(shapes: dict, device, dtype):
    from deepseek_vl2_lora.config import VL2Config
    from deepseek_vl2_lora.model import DeepseekVL2ForCausalLM

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


def skew_router(model, hot_fraction: float = 0.125, scale: float = 4.0) -> None:
    """Realistic imbalance: a few experts' gate rows get a larger norm, so they win top-k far more often."""
    from deepseek_vl2_lora.moe import MoE

    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, MoE):
                hot = max(1, int(m.gate.weight.shape[0] * hot_fraction))
                m.gate.weight[:hot] *= scale


def make_batch(shapes, tokens: int, seq: int, supervised: float, device):
    b = max(1, tokens // seq)
    g = torch.Generator().manual_seed(1)
    vocab = shapes["language"]["vocab_size"]
    ids = torch.randint(3, vocab, (b, seq), generator=g)
    labels = ids.clone()
    labels[:, : int(seq * (1 - supervised))] = -100
    batch = {"input_ids": ids, "attention_mask": torch.ones(b, seq, dtype=torch.long), "labels": labels}
    if shapes["images"]:
        v = shapes["vision"]
        side = -(-(v["image_size"] // v["patch_size"]) // 2)
        n_img = side * (side + 1) + 1 + side * (side + 1)  # one 1×1-tiled image per sample
        mask = torch.zeros(b, seq, dtype=torch.bool)
        mask[:, 1 : 1 + n_img] = True
        batch["labels"][mask] = -100
        batch.update(
            images=torch.randn(b, 2, 3, v["image_size"], v["image_size"], generator=g),
            images_seq_mask=mask,
            images_spatial_crop=torch.ones(b, 1, 2, dtype=torch.long),
        )
    return {k: t.to(device) for k, t in batch.items()}


def set_path(model, path: str, device) -> None:
    from deepseek_vl2_lora.attention import MLAttention
    from deepseek_vl2_lora.moe import RoutedExperts, grouped_mm_supported

    probe = torch.zeros(1, dtype=model.dtype, device=device)
    for m in model.modules():
        if isinstance(m, RoutedExperts):
            m.kernel = "loop" if path == "reference" or not grouped_mm_supported(probe) else "grouped"
        if hasattr(m, "backend") and hasattr(m, "o_proj"):
            optimized = "flash_attention_2" if device.type == "cuda" else "sdpa"
            m.backend = "eager" if path == "reference" else optimized
        if isinstance(m, MLAttention):
            m.absorbed_reference = path == "reference"


def useful_flops_per_token(model, seq: int) -> float:
    lm = model.config.language
    active = 0
    for name, p in model.language.named_parameters():
        if "embed_tokens" in name or p.dim() < 2:
            continue
        if ".experts." in name:  # stacked [E, out, in]: a token uses top-k of E
            active += p[0].numel() * lm.num_experts_per_tok
        else:
            active += p.numel()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if lm.use_mla:
        attn = lm.num_attention_heads * seq * (lm.q_head_dim + lm.v_head_dim)
    else:
        attn = lm.num_attention_heads * seq * 2 * lm.mha_head_dim
    return 4 * active + 2 * trainable + 3 * attn * lm.num_hidden_layers


def run_path(model, batch, path, steps, warmup, device, return_grads=False):
    set_path(model, path, device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, fused=device.type == "cuda")
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    times, first = [], None
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        out = model(**batch, return_logits=path == "reference")
        loss = out.loss + (out.aux_loss if out.aux_loss is not None else 0)
        loss.backward()
        if i == 0 and return_grads:
            first = (
                out.loss.detach().float().item(),
                {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.requires_grad},
            )
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return statistics.median(times), peak, first


def agreement(model, batch, device):
    """Loss and trainable gradients of both paths on the same weights and batch (no optimizer step)."""
    results = {}
    for path in ("reference", "optimized"):
        set_path(model, path, device)
        model.zero_grad(set_to_none=True)
        out = model(**batch, return_logits=path == "reference")
        (out.loss + (out.aux_loss if out.aux_loss is not None else 0)).backward()
        grads = {n: p.grad.float().clone() for n, p in model.named_parameters() if p.requires_grad}
        results[path] = (out.loss.float().item(), grads)
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
    """max/mean tokens per expert in the first MoE layer (1.0 = perfectly balanced)."""
    from deepseek_vl2_lora.moe import MoE

    counts = []

    def hook(mod, args, out):
        counts.append(torch.bincount(out[0].reshape(-1), minlength=mod.n_experts).float())

    moe = next(m for m in model.modules() if isinstance(m, MoE))
    handle = moe.gate.register_forward_hook(hook)
    with torch.no_grad():
        model(**batch, return_logits=False)
    handle.remove()
    return (counts[0].max() / counts[0].mean()).item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", choices=sorted(SHAPES), default="small")
    ap.add_argument("--tokens", type=int, default=8192, help="LM tokens per step")
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--supervised", type=float, default=1.0, help="fraction of each sequence with labels")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--router", choices=["uniform", "skewed", "both"], default="both")
    ap.add_argument("--paths", default="reference,optimized")
    ap.add_argument("--out", help="also write the results as JSON here")
    args = ap.parse_args()

    import yaml

    from deepseek_vl2_lora.policy import apply_policy

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    shapes = SHAPES[args.shapes]
    seq = min(args.seq, args.tokens) if args.shapes != "cpu-tiny" else min(args.seq, 64)
    tokens = args.tokens if args.shapes != "cpu-tiny" else min(args.tokens, 128)
    header = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "shapes": args.shapes,
        "tokens_per_step": tokens,
        "seq": seq,
        "dtype": str(dtype),
        "supervised": args.supervised,
    }
    print(json.dumps(header))
    results = []
    for router in ["uniform", "skewed"] if args.router == "both" else [args.router]:
        model = build(shapes, device, dtype)
        policy = yaml.safe_load(open(f"configs/policy/{shapes['policy']}.yaml"))
        apply_policy(model, policy)
        for p in model.parameters():  # trainable weights in fp32 (master weights), as the trainer keeps them
            if p.requires_grad:
                p.data = p.data.float()
        model.train()
        if router == "skewed":
            skew_router(model)
        batch = make_batch(shapes, tokens, seq, args.supervised, device)
        n_tokens = int(batch["attention_mask"].sum())
        flops = useful_flops_per_token(model, seq) * n_tokens
        row = {"router": router, "expert_imbalance": expert_imbalance(model, batch), **agreement(model, batch, device)}
        for path in args.paths.split(","):
            step, peak, _ = run_path(model, batch, path, args.steps, args.warmup, device)
            row[path] = {
                "step_s": step,
                "tokens_per_s": n_tokens / step,
                "tflops": flops / step / 1e12,
                "peak_gib": peak,
            }
            print(
                f"[{router}] {path:9s} step {step * 1e3:9.1f} ms  {n_tokens / step:10.0f} tok/s  "
                f"{flops / step / 1e12:7.1f} TFLOP/s  peak {peak if peak is None else round(peak, 2)} GiB",
                flush=True,
            )
        if "reference" in row and "optimized" in row:
            row["speedup"] = row["reference"]["step_s"] / row["optimized"]["step_s"]
            print(
                f"[{router}] speedup {row['speedup']:.2f}x  imbalance {row['expert_imbalance']:.2f}  "
                f"loss rel diff {row['loss_rel_diff']:.2e}  worst grad rel diff {row['worst_grad_rel_diff']:.2e}"
            )
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
