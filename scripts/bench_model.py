"""The benchmark's model side (scripts/bench.py): the shapes, random models built directly in their storage dtype,
the typed training config and `step.prepare_model`, skewed routing, and the batches."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from deepseek_vl2_lora import CONFIG_DIR  # noqa: E402
from deepseek_vl2_lora.model.tiny import FAMILIES  # noqa: E402

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


def shapes_at_depth(name: str, layers: int | None) -> dict:
    """The shapes with `layers` decoder layers (widths unchanged); an image shape's vision tower gets at most as
    many layers as the LM (its depth costs CPU tests most; the trained gradients depend on it only through the
    frozen features)."""
    shapes = copy.deepcopy(SHAPES[name])
    if layers is not None:
        shapes["language"]["num_hidden_layers"] = layers
        if shapes["images"]:
            shapes["vision"]["layers"] = min(shapes["vision"]["layers"], layers)
    return shapes


def build(shapes: dict, device, dtype, seed: int = 0):
    """Random weights made directly in `dtype` on `device` (no fp32 copy of the whole model on the way)."""
    from deepseek_vl2_lora.model import DeepseekVL2ForCausalLM
    from deepseek_vl2_lora.model.config import VL2Config

    v, lm = shapes["vision"], shapes["language"]
    raw = {
        "tile_tag": "2D",
        "global_view_pos": "head",
        "candidate_resolutions": [[v["image_size"]] * 2],
        "vision_config": v,
        "projector_config": {"n_embed": lm["hidden_size"], "input_dim": v["width"]},
        "language_config": lm,
    }
    with torch.device("meta"):
        model = DeepseekVL2ForCausalLM(VL2Config.from_dict(raw, source="bench shapes"), attn_implementation="eager")
    model = model.to(dtype).to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.fill_(1.0)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.normal_(0.0, 0.02 if "gate.weight" not in name else 0.1, generator=gen)
    for mod in model.modules():  # RoPE frequencies: fp32, on `device`
        if hasattr(mod, "inv_freq"):
            mod.reset_inv_freq(device)
    return model


def train_config(policy: str, expert_lora: int | None, precision: str, device):
    """The typed training config the bench's step reads: the policy preset, the trainer's switches."""
    import yaml

    from deepseek_vl2_lora.training.config import as_train_config

    preset = yaml.safe_load((CONFIG_DIR / "policy" / f"{policy}.yaml").read_text())
    if expert_lora:
        preset["groups"]["routed_experts"] = {"mode": "lora", "r": expert_lora, "alpha": 2 * expert_lora}
    trainer = {"precision": precision, "device": device.type, "recompute": "none", "compile_blocks": False}
    return as_train_config({"policy": preset, "optim": {"lr": 1e-5}, "trainer": trainer})


def prepare(model, cfg, dtype, seed: int = 0) -> None:
    """`step.prepare_model` (policy, fp32 master weights, train mode), then LoRA B drawn like the other weights."""
    from deepseek_vl2_lora.training.step import prepare_model

    torch.manual_seed(seed)  # LoRA A's initialisation
    prepare_model(model, cfg.policy, cfg.trainer)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:  # values exact in the storage dtype, like every other weight
                p.copy_((torch.randn(p.shape, generator=gen) * 0.02).to(dtype))


def skew_routing(model, zipf_s: float = 0.5, seed: int = 0) -> list:
    """Realistic imbalance. Random gates route almost uniformly; trained ones do not. Here every MoE layer routes
    by a fixed Zipf(s) popularity over its experts (∝ 1/rank^s, ranks shuffled per layer): each token's k
    distinct experts are drawn from it per layer and batch shape, the same in every path and in any copy of the
    model. The gate still runs and its top-k weights scale the chosen experts, so the router trains as usual.
    With 64 experts, top-6 and s = 0.5 the busiest expert gets ~3.8× the mean load and the idlest ~0.55×.
    Returns the hook handles (remove them to route by the gates again)."""
    from deepseek_vl2_lora.model.moe import Router

    chosen = {}

    def hook(layer, mod, args, out):
        idx, weight, aux = out
        key = (layer, tuple(idx.shape))
        if key not in chosen:
            g = torch.Generator().manual_seed(seed + 1000 * layer + idx.shape[0])
            rank = torch.randperm(mod.n_experts, generator=g).float() + 1
            popularity = rank.pow(-zipf_s).expand(idx.shape[0], -1)
            picks = torch.multinomial(popularity, idx.shape[1], replacement=False, generator=g)
            chosen[key] = picks.to(idx.device, idx.dtype)
        return chosen[key], weight, aux

    routers = [m for m in model.modules() if isinstance(m, Router)]
    return [m.register_forward_hook(lambda *a, i=i: hook(i, *a)) for i, m in enumerate(routers)]


def route(model, router: str, zipf_s: float) -> list:
    """Skewed routing for router "skewed"; the hooks, for `unroute`."""
    if router != "skewed":
        return []
    torch._dynamo.reset()  # compiled layers do not guard on hooks: a graph compiled before would ignore them
    return skew_routing(model, zipf_s)


def unroute(hooks: list) -> None:
    for h in hooks:
        h.remove()
    if hooks:
        torch._dynamo.reset()


def image_tokens(shapes) -> int:
    """Tokens of one 2×2-tiled image in the official 2D layout."""
    v = shapes["vision"]
    side = -(-(v["image_size"] // v["patch_size"]) // 2)
    return side * (side + 1) + 1 + (side * 2) * (side * 2 + 1)


def make_batch(shapes, tokens: int, seq: int, supervised: float, sample_tokens=None, images_per_row=2):
    """`tokens // seq` rows of `seq` random tokens. Image shapes: `images_per_row` 2×2-tiled images at the start
    of each row, their positions unsupervised. With `sample_tokens`, each row is packed with samples of 0.5–1.5×
    that length (`segment_ids`; the first sample holds the images). On the host, as the trainer's collator."""
    b = max(1, tokens // seq)
    g = torch.Generator().manual_seed(1)
    vocab = shapes["language"]["vocab_size"]
    ids = torch.randint(3, vocab, (b, seq), generator=g)
    labels = ids.clone()
    labels[:, : int(seq * (1 - supervised))] = -100
    batch = {"input_ids": ids, "attention_mask": torch.ones(b, seq, dtype=torch.long), "labels": labels}
    images_end = 0
    if shapes["images"] and images_per_row:
        v, n_img = shapes["vision"], image_tokens(shapes)
        images_end = 1 + images_per_row * (n_img + 1)
        if images_end > seq:
            raise SystemExit(f"{images_per_row} images of {n_img} tokens do not fit a row of {seq}")
        mask = torch.zeros(b, seq, dtype=torch.bool)
        for i in range(images_per_row):
            start = 1 + i * (n_img + 1)
            mask[:, start : start + n_img] = True
        batch["labels"][mask] = -100
        n_tiles = images_per_row * 5
        batch.update(
            images=torch.randn(b, n_tiles, 3, v["image_size"], v["image_size"], generator=g),
            images_seq_mask=mask,
            images_spatial_crop=torch.tensor([[2, 2]] * images_per_row).expand(b, -1, -1).contiguous(),
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
    return batch
