"""The official DeepSeek-VL2 eval forward, rewritten as plain functional PyTorch over a state dict.

Reproduces ``DeepseekVLV2ForCausalLM.forward(...)`` in eval mode (``modeling_deepseek_vl_v2.py`` with
``modeling_deepseek.py``, ``siglip_vit.py`` and transformers 4.38.2's ``LlamaAttention`` for the MHA variant),
reading config.json and the safetensors files directly. No nn.Module, timm or transformers code is used.

Semantics reproduced on purpose (see reference doc sections 1, 2, 3 and 5):

- sparse config.json + ``DeepseekV2Config`` / ``VisionEncoderConfig`` / ``MlpProjectorConfig`` defaults;
- SigLIP ViT: conv patch embed with bias, + pos_embed, pre-norm blocks (LN eps 1e-6, fused qkv with bias,
  softmax attention with scale head_dim**-0.5, tanh-GELU MLP), final ``norm``; ``attn_pool`` is never run;
- projector ``downsample_mlp_gelu``: zero-pad bottom/right to a multiple of the ratio, ``F.unfold`` feature order
  (channel-major, then kernel position), Linear -> exact GELU -> Linear;
- ``prepare_inputs_embeds``: global view with a newline column, ``view_seperator``, local tiles
  ``(th h) (tw w)`` with a newline per row, ``global_view_pos`` head/tail, ``masked_scatter_``;
- LM: fp32 RMSNorm; MLA in the weight-absorbed eager form (q low-rank path when ``q_lora_rank`` is set);
  official RoPE (de-interleave then rotate_half, on the rope dims only; linear / dynamic / yarn scaling and the
  yarn softmax mscale); Llama-style MHA (NeoX rotate_half over the full head dim) when ``use_mla`` is false;
  additive 4D causal + padding mask with the dtype's min value;
- MoE: fp32 gate, softmax / sigmoid, greedy / group_limited_greedy / noaux_tc (biased selection, group score =
  sum of the top 2, weights gathered from the unbiased scores, masked entries filled with 0.0), normalisation,
  routed experts + shared experts; dense MLP when ``i < first_k_dense_replace`` or ``i % moe_layer_freq != 0``;
- ``lm_head`` -> fp32 logits; CE on shifted labels (ignore -100, mean) when labels are given.
"""

from __future__ import annotations

import copy
import json
import math
import os
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

# ----------------------------------------------------------------------------------------------------------------
# Config: defaults of the official config classes (the released config.json files are sparse)
# ----------------------------------------------------------------------------------------------------------------

# ``DeepseekV2Config.__init__`` defaults (configuration_deepseek.py) + the PretrainedConfig ones that matter.
# NOTE: ``topk_method`` defaults to the misspelled 'gready' (reference doc section 2); it matches no branch of
# ``MoEGate.forward``, so a config that relies on it cannot route (``official_gate`` raises).
DEEPSEEK_V2_DEFAULTS: dict = {
    "vocab_size": 102400,
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "moe_intermediate_size": 1407,
    "num_hidden_layers": 30,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "n_shared_experts": None,
    "n_routed_experts": None,
    "ep_size": 1,
    "routed_scaling_factor": 1.0,
    "kv_lora_rank": 512,
    "q_lora_rank": 1536,
    "qk_rope_head_dim": 64,
    "v_head_dim": 128,
    "qk_nope_head_dim": 128,
    "topk_method": "gready",
    "n_group": None,
    "topk_group": None,
    "num_experts_per_tok": None,
    "moe_layer_freq": 1,
    "first_k_dense_replace": 0,
    "norm_topk_prob": False,
    "scoring_func": "softmax",
    "aux_loss_alpha": 0.001,
    "seq_aux": True,
    "hidden_act": "silu",
    "max_position_embeddings": 2048,
    "initializer_range": 0.02,
    "rms_norm_eps": 1e-6,
    "use_cache": True,
    "pad_token_id": None,
    "bos_token_id": 100000,
    "eos_token_id": 100001,
    "pretraining_tp": 1,
    "tie_word_embeddings": False,
    "rope_theta": 10000.0,
    "rope_scaling": None,
    "attention_bias": False,
    "attention_dropout": 0.0,
    "use_mla": True,
}

# ``VisionEncoderConfig`` defaults (modeling_deepseek_vl_v2.py): siglip_large_patch16_384, NOT the SO400M values.
VISION_DEFAULTS: dict = {
    "model_name": "siglip_large_patch16_384",
    "image_size": 384,
    "patch_size": 16,
    "width": 1024,
    "layers": 24,
    "heads": 16,
    "mlp_ratio": 4,
    "global_pool": "map",
    "ignore_head": True,
    "class_token": False,
    "num_classes": 0,
    "use_checkpoint": False,
    "weight_init": "skip",
    "deterministic": False,
    "num_recomputing_layers": 0,
}

# ``MlpProjectorConfig`` defaults. ``token_pooling`` is a class attribute that is never set from the config.
PROJECTOR_DEFAULTS: dict = {
    "projector_type": "downsample_mlp_gelu",
    "input_dim": 1152,
    "n_embed": 2048,
    "depth": 2,
    "mlp_ratio": 1,
    "downsample_ratio": 2,
    "token_pooling": False,
}

# ``DeepseekVLV2Config.__init__`` defaults (``tile_tag`` really defaults to the junk string "tile_tag").
TOP_DEFAULTS: dict = {
    "tile_tag": "tile_tag",
    "global_view_pos": "head",
    "candidate_resolutions": [[384, 384]],
}


def densify_config(config: Mapping) -> dict:
    """Apply the official class defaults to a (sparse) top-level config dict. Idempotent; input not modified."""
    out = copy.deepcopy(dict(config))
    for key, value in TOP_DEFAULTS.items():
        out.setdefault(key, copy.deepcopy(value))
    for sub, defaults in (
        ("vision_config", VISION_DEFAULTS),
        ("projector_config", PROJECTOR_DEFAULTS),
        ("language_config", DEEPSEEK_V2_DEFAULTS),
    ):
        dense = copy.deepcopy(defaults)
        dense.update(copy.deepcopy(dict(out.get(sub) or {})))
        out[sub] = dense
    lang = out["language_config"]
    # DeepseekV2Config: ``num_key_value_heads=None`` falls back to the head count; eps is cast to float.
    if lang["num_key_value_heads"] is None:
        lang["num_key_value_heads"] = lang["num_attention_heads"]
    lang["rms_norm_eps"] = float(lang["rms_norm_eps"])
    out["projector_config"]["token_pooling"] = False
    return out


def load_official_config(ckpt_dir: str) -> dict:
    """Read ``config.json`` from ``ckpt_dir`` and return the dense config (official defaults applied)."""
    with open(os.path.join(ckpt_dir, "config.json")) as f:
        return densify_config(json.load(f))


def load_official_state_dict(ckpt_dir: str, dtype: torch.dtype | None = torch.float32) -> dict:
    """Load ``model.safetensors`` or the shards listed in ``model.safetensors.index.json``."""
    index_path = os.path.join(ckpt_dir, "model.safetensors.index.json")
    if os.path.exists(index_path):
        with open(index_path) as f:
            weight_map = json.load(f)["weight_map"]
        sd: dict = {}
        for shard in sorted(set(weight_map.values())):
            part = load_file(os.path.join(ckpt_dir, shard))
            for key in part:
                if weight_map.get(key) != shard:
                    raise ValueError(f"{key} found in {shard} but the index maps it to {weight_map.get(key)}")
            sd.update(part)
        missing = set(weight_map) - set(sd)
        if missing:
            raise ValueError(f"keys listed in the index but absent from the shards: {sorted(missing)[:5]}")
    else:
        sd = load_file(os.path.join(ckpt_dir, "model.safetensors"))
    if dtype is not None:
        sd = {k: v.to(dtype) for k, v in sd.items()}
    return sd


def _sub(sd: Mapping, prefix: str) -> dict:
    """The entries of ``sd`` under ``prefix`` with the prefix stripped."""
    return {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}


def _linear(x: torch.Tensor, w: Mapping, name: str) -> torch.Tensor:
    return F.linear(x, w[name + ".weight"], w.get(name + ".bias"))


# ----------------------------------------------------------------------------------------------------------------
# Vision: SigLIP ViT (siglip_vit.VisionTransformer.forward_features) and the projector
# ----------------------------------------------------------------------------------------------------------------


def official_vision(tiles: torch.Tensor, sd: Mapping, vcfg: Mapping) -> torch.Tensor:
    """[N, 3, S, S] -> [N, (S // patch)**2, width]. ``sd`` holds the ``vision.*`` keys (prefix stripped or not)."""
    w = _sub(sd, "vision.") if any(k.startswith("vision.") for k in sd) else dict(sd)
    size, patch, heads = vcfg["image_size"], vcfg["patch_size"], vcfg["heads"]
    if tuple(tiles.shape[-2:]) != (size, size):  # timm PatchEmbed is strict about the image size
        raise ValueError(f"tiles are {tuple(tiles.shape[-2:])}, the vision tower expects {size}x{size}")
    x = F.conv2d(tiles, w["patch_embed.proj.weight"], w["patch_embed.proj.bias"], stride=patch)
    x = x.flatten(2).transpose(1, 2)  # [N, L, C] row-major over the patch grid
    x = x + w["pos_embed"]  # no class token, no register tokens, no pre-norm
    n, length, c = x.shape
    hd = c // heads
    i = 0
    while f"blocks.{i}.norm1.weight" in w:
        b = _sub(w, f"blocks.{i}.")
        y = F.layer_norm(x, (c,), b["norm1.weight"], b["norm1.bias"], eps=1e-6)
        qkv = _linear(y, b, "attn.qkv").reshape(n, length, 3, heads, hd)
        q, k, v = qkv.unbind(2)  # [N, L, heads, hd]
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        att = (q * hd**-0.5) @ k.transpose(-2, -1)
        att = att.softmax(dim=-1)
        y = (att @ v).transpose(1, 2).reshape(n, length, c)
        x = x + _linear(y, b, "attn.proj")
        y = F.layer_norm(x, (c,), b["norm2.weight"], b["norm2.bias"], eps=1e-6)
        y = F.gelu(_linear(y, b, "mlp.fc1"), approximate="tanh")
        x = x + _linear(y, b, "mlp.fc2")
        i += 1
    if i != vcfg["layers"]:
        raise ValueError(f"checkpoint has {i} vision blocks, config says {vcfg['layers']}")
    return F.layer_norm(x, (c,), w["norm.weight"], w["norm.bias"], eps=1e-6)


def official_downsample_unfold(x: torch.Tensor, ratio: int = 2) -> torch.Tensor:
    """The projector's 4-to-1 concat: [N, h*w, C] -> [N, ceil(h/r)**2, C*r*r] in ``F.unfold`` feature order."""
    bs, hw, c = x.shape
    h = w = int(hw**0.5)
    if h * w != hw:
        raise ValueError(f"{hw} tokens is not a square grid")
    pad = ratio - h % ratio if h % ratio else 0
    x = x.reshape(bs, h, w, c)
    if pad > 0:
        x = F.pad(x, (0, 0, 0, pad, 0, pad), "constant", 0)  # zero rows at the bottom, zero columns on the right
    x = x.permute(0, 3, 1, 2)
    x = F.unfold(x, kernel_size=ratio, stride=ratio, padding=0)  # [N, C*r*r, L'], channel-major then kernel pos
    return x.permute(0, 2, 1)


def official_projector(feats: torch.Tensor, sd: Mapping, pcfg: Mapping) -> torch.Tensor:
    """``MlpProjector`` (downsample_mlp_gelu): [N, L, C] -> [N, L', n_embed]."""
    if pcfg["projector_type"] != "downsample_mlp_gelu":
        raise NotImplementedError(pcfg["projector_type"])
    w = _sub(sd, "projector.") if any(k.startswith("projector.") for k in sd) else dict(sd)
    x = official_downsample_unfold(feats, pcfg["downsample_ratio"])
    # Sequential(Linear, GELU, [Linear, GELU]*, Linear): the Linear layers sit at even indices 0, 2, 4, ...
    n_linear = pcfg["depth"]
    for j in range(n_linear):
        if j > 0:
            x = F.gelu(x)  # exact GELU (nn.GELU()), not tanh
        x = _linear(x, w, f"layers.{2 * j}")
    return x


def official_format_image(
    tiles: torch.Tensor, tw: int, th: int, newline: torch.Tensor, sep: torch.Tensor, global_view_pos: str = "head"
) -> torch.Tensor:
    """Sequence of one image (tile_tag "2D"): ``tiles`` [1 + tw*th, h*w, D] (global view first) -> [n, D].

    Global view with ``image_newline`` appended to each of its h rows; local tiles (row-major, ``th`` rows of
    ``tw``) arranged as ``(th h) (tw w)`` with a newline per row; joined by ``view_seperator``.
    """
    n_tiles, hw, d = tiles.shape
    if n_tiles != 1 + tw * th:
        raise ValueError(f"{n_tiles} tiles for a {tw}x{th} image")
    h = w = int(hw**0.5)
    glob = tiles[0].view(h, w, d)
    glob = torch.cat([glob, newline.view(1, 1, d).expand(h, 1, d)], dim=1).reshape(-1, d)
    # "(th tw) (h w) d -> (th h) (tw w) d"
    local = tiles[1:].view(th, tw, h, w, d).permute(0, 2, 1, 3, 4).reshape(th * h, tw * w, d)
    local = torch.cat([local, newline.view(1, 1, d).expand(th * h, 1, d)], dim=1).reshape(-1, d)
    if global_view_pos == "head":
        return torch.cat([glob, sep[None], local], dim=0)
    return torch.cat([local, sep[None], glob], dim=0)


def official_prepare_inputs_embeds(batch: Mapping, sd: Mapping, cfg: Mapping, strict: bool = True):
    """``DeepseekVLV2ForCausalLM.prepare_inputs_embeds``; returns [B, T, hidden].

    ``strict`` additionally checks that ``images_seq_mask`` has exactly as many True positions as there are
    formatted image features (the official ``masked_scatter_`` would silently use a prefix if there were more).
    """
    dtype = sd["language.model.embed_tokens.weight"].dtype
    input_ids = batch["input_ids"]
    embed = F.embedding(input_ids, sd["language.model.embed_tokens.weight"])
    images = batch.get("images")
    crops = batch.get("images_spatial_crop")
    if images is None or crops is None or int(crops.sum()) == 0:
        return embed
    bs, max_n_images, _ = crops.shape
    tiles, counts = [], []
    for idx in range(bs):
        n = 0
        for jdx in range(max_n_images):
            tw, th = (int(v) for v in crops[idx, jdx])
            if tw == 0 or th == 0:
                break
            n += 1 + tw * th
        counts.append(n)
        tiles.append(images[idx, :n])
    total = torch.cat(tiles, dim=0).to(dtype)
    if total.shape[0] == 0:
        return embed
    feats = official_vision(total, sd, cfg["vision_config"])
    img = official_projector(feats, sd, cfg["projector_config"])  # [tiles, h*w, D]
    newline, sep = sd["image_newline"], sd["view_seperator"]
    if cfg["tile_tag"] != "2D":
        raise NotImplementedError("only tile_tag '2D' is implemented (the 1D branch is abandoned upstream)")
    embed = embed.clone()
    tile_index = 0
    mask = batch["images_seq_mask"].bool()
    for idx in range(bs):
        per_image = []
        for jdx in range(max_n_images):
            tw, th = (int(v) for v in crops[idx, jdx])
            if tw == 0 or th == 0:
                break
            per_image.append(
                official_format_image(
                    img[tile_index : tile_index + 1 + tw * th], tw, th, newline, sep, cfg["global_view_pos"]
                )
            )
            tile_index += 1 + tw * th
        if per_image:
            feats_i = torch.cat(per_image, dim=0)
            if strict and int(mask[idx].sum()) != feats_i.shape[0]:
                raise ValueError(
                    f"sample {idx}: images_seq_mask has {int(mask[idx].sum())} positions, "
                    f"the images give {feats_i.shape[0]} features"
                )
            embed[idx] = embed[idx].masked_scatter(mask[idx].unsqueeze(-1), feats_i)
    return embed


# ----------------------------------------------------------------------------------------------------------------
# LM pieces
# ----------------------------------------------------------------------------------------------------------------


def official_rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``DeepseekV2RMSNorm``: fp32 statistics, ``weight * x.to(input_dtype)``."""
    in_dtype = x.dtype
    y = x.to(torch.float32)
    y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + eps)
    return weight * y.to(in_dtype)


def yarn_get_mscale(scale: float = 1.0, mscale: float = 1.0) -> float:
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def _yarn_find_correction_dim(num_rotations, dim, base, max_pos):
    return (dim * math.log(max_pos / (num_rotations * 2 * math.pi))) / (2 * math.log(base))


def rope_cos_sin(
    dim: int,
    position_ids: torch.Tensor,
    theta: float = 10000.0,
    rope_scaling: Mapping | None = None,
    max_position_embeddings: int = 2048,
    seq_len: int | None = None,
    dtype: torch.dtype = torch.float32,
):
    """cos/sin [B, T, dim] in the ``cat((freqs, freqs))`` layout of ``DeepseekV2RotaryEmbedding`` and its variants.

    ``seq_len`` is the length the official cache is (re)built for (kv length); only dynamic NTK depends on it.
    """
    position_ids = position_ids.long()
    if seq_len is None:
        seq_len = int(position_ids.max()) + 1
    arange = torch.arange(0, dim, 2, dtype=torch.float32)
    inv_freq = 1.0 / (theta ** (arange / dim))
    t = position_ids.to(torch.float32)
    mult = 1.0
    kind = None if rope_scaling is None else rope_scaling["type"]
    if kind == "linear":
        t = t / rope_scaling["factor"]
    elif kind == "dynamic":
        factor = rope_scaling["factor"]
        if seq_len > max_position_embeddings:
            base = theta * ((factor * seq_len / max_position_embeddings) - (factor - 1)) ** (dim / (dim - 2))
            inv_freq = 1.0 / (base ** (arange / dim))
    elif kind == "yarn":
        factor = rope_scaling["factor"]
        orig = rope_scaling.get("original_max_position_embeddings", 4096)
        beta_fast = rope_scaling.get("beta_fast", 32)
        beta_slow = rope_scaling.get("beta_slow", 1)
        mscale = rope_scaling.get("mscale", 1)
        mscale_all_dim = rope_scaling.get("mscale_all_dim", 0)
        freq_extra = 1.0 / (theta ** (arange / dim))
        freq_inter = 1.0 / (factor * theta ** (arange / dim))
        low = max(math.floor(_yarn_find_correction_dim(beta_fast, dim, theta, orig)), 0)
        high = min(math.ceil(_yarn_find_correction_dim(beta_slow, dim, theta, orig)), dim - 1)
        if low == high:
            high += 0.001
        ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
        extra_mask = 1.0 - ramp
        inv_freq = freq_inter * (1 - extra_mask) + freq_extra * extra_mask
        mult = float(yarn_get_mscale(factor, mscale) / yarn_get_mscale(factor, mscale_all_dim))
    elif kind is not None:
        raise ValueError(f"Unknown RoPE scaling type {kind}")
    freqs = t[..., None] * inv_freq  # [B, T, dim/2]
    emb = torch.cat((freqs, freqs), dim=-1)
    return (emb.cos() * mult).to(dtype), (emb.sin() * mult).to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def official_rope(
    x: torch.Tensor,
    position_ids: torch.Tensor,
    theta: float = 10000.0,
    deinterleave: bool = True,
    rope_scaling: Mapping | None = None,
    max_position_embeddings: int = 2048,
    seq_len: int | None = None,
) -> torch.Tensor:
    """Rotate ``x`` [B, H, T, d] at ``position_ids`` [B or 1, T].

    ``deinterleave=True``: DeepSeek-V2 ``apply_rotary_pos_emb`` (``view(d/2, 2).transpose`` then rotate_half); the
    result stays in the de-interleaved layout, exactly like the official code. ``deinterleave=False``: Llama/NeoX.
    """
    b, h, s, d = x.shape
    cos, sin = rope_cos_sin(d, position_ids, theta, rope_scaling, max_position_embeddings, seq_len, x.dtype)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # [B, 1, T, d]
    if deinterleave:
        x = x.view(b, h, s, d // 2, 2).transpose(4, 3).reshape(b, h, s, d)
    return x * cos + _rotate_half(x) * sin


def mla_softmax_scale(lcfg: Mapping) -> float:
    scale = (lcfg["qk_nope_head_dim"] + lcfg["qk_rope_head_dim"]) ** -0.5
    rs = lcfg.get("rope_scaling")
    if rs is not None:
        mscale_all_dim = rs.get("mscale_all_dim", 0)
        if mscale_all_dim:
            m = yarn_get_mscale(rs["factor"], mscale_all_dim)
            scale = scale * m * m
    return scale


def causal_padding_mask(attention_mask: torch.Tensor | None, b: int, t: int, dtype: torch.dtype):
    """Additive [B, 1, T, T] mask like ``_prepare_4d_causal_attention_mask`` (0 or finfo.min)."""
    allowed = torch.ones(t, t, dtype=torch.bool).tril()[None, None].expand(b, 1, t, t)
    if attention_mask is not None:
        allowed = allowed & attention_mask.bool()[:, None, None, :]
    out = torch.zeros(b, 1, t, t, dtype=dtype)
    return out.masked_fill(~allowed, torch.finfo(dtype).min)


def official_mla_absorbed(
    hidden: torch.Tensor,
    w: Mapping,
    lcfg: Mapping,
    position_ids: torch.Tensor | None = None,
    mask4d: torch.Tensor | None = None,
) -> torch.Tensor:
    """``DeepseekV2Attention.forward`` (mla_eager, no cache). ``w`` holds the ``self_attn.*`` keys, prefix stripped.

    ``mask4d`` is the additive [B, 1, T, T] mask (default: causal only); ``position_ids`` default to arange.
    """
    bsz, q_len, _ = hidden.shape
    n_heads = lcfg["num_attention_heads"]
    nope, rope, vdim = lcfg["qk_nope_head_dim"], lcfg["qk_rope_head_dim"], lcfg["v_head_dim"]
    rank = lcfg["kv_lora_rank"]
    if position_ids is None:
        position_ids = torch.arange(q_len)[None]
    if mask4d is None:
        mask4d = causal_padding_mask(None, bsz, q_len, hidden.dtype)
    if lcfg["q_lora_rank"] is None:
        q = _linear(hidden, w, "q_proj")
    else:
        # q_a_layernorm / kv_a_layernorm are built without eps -> always 1e-6, whatever rms_norm_eps says.
        q = _linear(official_rmsnorm(_linear(hidden, w, "q_a_proj"), w["q_a_layernorm.weight"]), w, "q_b_proj")
    q = q.view(bsz, q_len, n_heads, nope + rope).transpose(1, 2)
    q_nope, q_pe = torch.split(q, [nope, rope], dim=-1)
    ckv = _linear(hidden, w, "kv_a_proj_with_mqa")
    ckv, k_pe = torch.split(ckv, [rank, rope], dim=-1)
    ckv = official_rmsnorm(ckv, w["kv_a_layernorm.weight"])
    k_pe = k_pe.view(bsz, q_len, 1, rope).transpose(1, 2)
    rope_kw = dict(
        theta=lcfg["rope_theta"],
        deinterleave=True,
        rope_scaling=lcfg.get("rope_scaling"),
        max_position_embeddings=lcfg["max_position_embeddings"],
        seq_len=q_len,
    )
    q_pe = official_rope(q_pe, position_ids, **rope_kw)
    k_pe = official_rope(k_pe, position_ids, **rope_kw)
    kv_b = w["kv_b_proj.weight"].view(n_heads, -1, rank)
    q_absorb, out_absorb = kv_b[:, :nope, :], kv_b[:, nope:, :]
    q_nope = torch.matmul(q_nope, q_absorb)  # [B, H, T, rank]
    scores = torch.matmul(q_pe, k_pe.mT) + torch.matmul(q_nope, ckv.unsqueeze(-3).mT)
    scores = scores * mla_softmax_scale(lcfg) + mask4d
    probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(q_pe.dtype)
    out = torch.einsum("bhql,blc->bhqc", probs, ckv)
    out = torch.matmul(out, out_absorb.mT)  # [B, H, T, v]
    out = out.transpose(1, 2).reshape(bsz, q_len, n_heads * vdim)
    return _linear(out, w, "o_proj")


def official_mha(
    hidden: torch.Tensor,
    w: Mapping,
    lcfg: Mapping,
    position_ids: torch.Tensor | None = None,
    mask4d: torch.Tensor | None = None,
) -> torch.Tensor:
    """transformers 4.38.2 ``LlamaAttention`` (eager, no cache): used when ``use_mla`` is false."""
    bsz, q_len, hid = hidden.shape
    n_heads, n_kv = lcfg["num_attention_heads"], lcfg["num_key_value_heads"]
    hd = hid // n_heads
    if lcfg.get("rope_scaling") is not None:
        raise NotImplementedError("rope_scaling for the Llama MHA path is not part of this reference")
    if position_ids is None:
        position_ids = torch.arange(q_len)[None]
    if mask4d is None:
        mask4d = causal_padding_mask(None, bsz, q_len, hidden.dtype)
    q = _linear(hidden, w, "q_proj").view(bsz, q_len, n_heads, hd).transpose(1, 2)
    k = _linear(hidden, w, "k_proj").view(bsz, q_len, n_kv, hd).transpose(1, 2)
    v = _linear(hidden, w, "v_proj").view(bsz, q_len, n_kv, hd).transpose(1, 2)
    q = official_rope(q, position_ids, theta=lcfg["rope_theta"], deinterleave=False)
    k = official_rope(k, position_ids, theta=lcfg["rope_theta"], deinterleave=False)
    rep = n_heads // n_kv
    k = k.repeat_interleave(rep, dim=1)
    v = v.repeat_interleave(rep, dim=1)
    scores = torch.matmul(q, k.transpose(2, 3)) / math.sqrt(hd) + mask4d
    probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    out = torch.matmul(probs, v).transpose(1, 2).reshape(bsz, q_len, hid)
    return _linear(out, w, "o_proj")


def official_mlp(x: torch.Tensor, w: Mapping) -> torch.Tensor:
    """``DeepseekV2MLP`` (SwiGLU, no biases, silu)."""
    return F.linear(
        F.silu(F.linear(x, w["gate_proj.weight"])) * F.linear(x, w["up_proj.weight"]), w["down_proj.weight"]
    )


def official_select(scores: torch.Tensor, bias: torch.Tensor | None, lcfg: Mapping):
    """Top-k selection of ``MoEGate.forward`` on the [N, E] scores (after softmax/sigmoid), before normalisation.

    Returns ``(topk_idx, topk_weight)`` with the official ``sorted=False`` top-k (slot order is unspecified; compare
    sorted or as sets).
    """
    n, n_exp = scores.shape
    k = lcfg["num_experts_per_tok"]
    method = lcfg["topk_method"]
    if method == "greedy":
        topk_weight, topk_idx = torch.topk(scores, k=k, dim=-1, sorted=False)
    elif method in ("group_limited_greedy", "noaux_tc"):
        n_group, topk_group = lcfg["n_group"], lcfg["topk_group"]
        if method == "group_limited_greedy":
            choice = scores
            group_scores = choice.view(n, n_group, -1).max(dim=-1).values
        else:
            if bias is None:
                raise ValueError("noaux_tc needs e_score_correction_bias")
            choice = scores + bias.to(scores.dtype).unsqueeze(0)
            group_scores = choice.view(n, n_group, -1).topk(2, dim=-1)[0].sum(dim=-1)
        group_idx = torch.topk(group_scores, k=topk_group, dim=-1, sorted=False)[1]
        group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
        score_mask = group_mask.unsqueeze(-1).expand(n, n_group, n_exp // n_group).reshape(n, -1)
        tmp = choice.masked_fill(~score_mask.bool(), 0.0)  # official: 0.0, not -inf
        topk_weight, topk_idx = torch.topk(tmp, k=k, dim=-1, sorted=False)
        if method == "noaux_tc":
            topk_weight = scores.gather(1, topk_idx)  # weights from the UNBIASED scores
    else:
        raise ValueError(f"topk_method {method!r} matches no MoEGate branch (the config default is 'gready')")
    return topk_idx, topk_weight


def official_gate(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    cfg: Mapping,
    training: bool = False,
    allow_noaux_training: bool = False,
):
    """``MoEGate.forward`` -> ``(topk_idx [N, k], topk_weight [N, k] fp32, aux_loss or None)``.

    ``hidden`` is [B, S, D] (or [N, D], read as B=1, S=N: the per-sequence aux loss needs the split).
    ``cfg`` is the language config (or a full config holding one). With ``noaux_tc`` and ``training=True`` the
    official gate asserts; pass ``allow_noaux_training=True`` to run the same math anyway (what the doc suggests).
    """
    lcfg = cfg.get("language_config", cfg)
    if hidden.dim() == 2:
        hidden = hidden.unsqueeze(0)
    bsz, seq_len, h = hidden.shape
    x = hidden.reshape(-1, h)
    logits = F.linear(x.to(torch.float32), weight.to(torch.float32), None)
    if lcfg["scoring_func"] == "softmax":
        scores = logits.softmax(dim=-1, dtype=torch.float32)
    elif lcfg["scoring_func"] == "sigmoid":
        scores = logits.sigmoid()
    else:
        raise NotImplementedError(f"insupportable scoring function for MoE gating: {lcfg['scoring_func']}")
    if lcfg["topk_method"] == "noaux_tc" and training and not allow_noaux_training:
        raise AssertionError("noaux_tc asserts not self.training in the official MoEGate")
    topk_idx, topk_weight = official_select(scores, bias, lcfg)
    k = lcfg["num_experts_per_tok"]
    rsf = lcfg["routed_scaling_factor"]
    if k > 1 and lcfg["norm_topk_prob"]:
        topk_weight = topk_weight / (topk_weight.sum(dim=-1, keepdim=True) + 1e-20) * rsf
    else:
        topk_weight = topk_weight * rsf
    aux = None
    alpha = lcfg["aux_loss_alpha"]
    if training and alpha > 0.0:
        n_exp = lcfg["n_routed_experts"]
        idx_b = topk_idx.view(bsz, -1)
        if lcfg["seq_aux"]:
            ce = torch.zeros(bsz, n_exp)
            ce.scatter_add_(1, idx_b, torch.ones(bsz, seq_len * k)).div_(seq_len * k / n_exp)
            aux = (ce * scores.view(bsz, seq_len, -1).mean(dim=1)).sum(dim=1).mean() * alpha
        else:
            ce = F.one_hot(idx_b.view(-1), num_classes=n_exp).float().mean(0)
            aux = (scores.mean(0) * ce * n_exp).sum() * alpha
    return topk_idx, topk_weight, aux


def _route_margin(scores: torch.Tensor, bias: torch.Tensor | None, lcfg: Mapping) -> torch.Tensor:
    """Per-token gap that protects the selection from float noise: the k-th minus the (k+1)-th candidate score
    (and, for grouped methods, the topk_group-th minus the next group score). Small values = near-ties."""
    n, n_exp = scores.shape
    k = lcfg["num_experts_per_tok"]
    method = lcfg["topk_method"]
    choice = scores + bias.unsqueeze(0) if method == "noaux_tc" else scores
    gaps = []
    if method in ("group_limited_greedy", "noaux_tc"):
        n_group, topk_group = lcfg["n_group"], lcfg["topk_group"]
        if method == "noaux_tc":
            g = choice.view(n, n_group, -1).topk(2, dim=-1)[0].sum(-1)
        else:
            g = choice.view(n, n_group, -1).max(-1).values
        if topk_group < n_group:
            gs = g.sort(dim=-1, descending=True).values
            gaps.append(gs[:, topk_group - 1] - gs[:, topk_group])
        gm = torch.zeros(n, n_group).scatter_(1, torch.topk(g, topk_group, dim=-1)[1], 1)
        choice = choice.masked_fill(~gm.unsqueeze(-1).expand(n, n_group, n_exp // n_group).reshape(n, -1).bool(), 0)
    if k < n_exp:
        cs = choice.sort(dim=-1, descending=True).values
        gaps.append(cs[:, k - 1] - cs[:, k])
    if not gaps:
        return torch.full((n,), float("inf"))
    return torch.stack(gaps, -1).min(-1).values


def official_moe(
    hidden: torch.Tensor, w: Mapping, lcfg: Mapping, training: bool = False, allow_noaux_training: bool = False
):
    """``DeepseekV2MoE.forward`` -> ``(y, aux_loss_or_None, route_info)``; ``w`` holds the ``mlp.*`` keys.

    Eval mode (``moe_infer``) and training mode compute the same values; this does
    ``sum_k w_k * expert_{idx_k}(x)`` with a per-expert loop, in the slot order of the gate, then adds the shared
    experts.
    """
    shape = hidden.shape
    topk_idx, topk_weight, aux = official_gate(
        hidden, w["gate.weight"], w.get("gate.e_score_correction_bias"), lcfg, training, allow_noaux_training
    )
    x = hidden.reshape(-1, shape[-1])
    n, k = topk_idx.shape
    outs = x.new_zeros(n, k, shape[-1])
    for e in range(lcfg["n_routed_experts"]):
        tok, slot = torch.nonzero(topk_idx == e, as_tuple=True)
        if tok.numel() == 0:
            continue
        outs[tok, slot] = official_mlp(x[tok], _sub(w, f"experts.{e}."))
    y = (outs.to(topk_weight.dtype) * topk_weight.unsqueeze(-1)).sum(dim=1).to(x.dtype).view(shape)
    if lcfg["n_shared_experts"] is not None:
        y = y + official_mlp(hidden, _sub(w, "shared_experts."))
    with torch.no_grad():
        logits = F.linear(x.float(), w["gate.weight"].float())
        scores = logits.softmax(-1) if lcfg["scoring_func"] == "softmax" else logits.sigmoid()
        bias = w.get("gate.e_score_correction_bias")
        margin = _route_margin(scores, None if bias is None else bias.float(), lcfg)
    info = {"topk_idx": topk_idx, "topk_weight": topk_weight, "scores": scores, "margin": margin, "hidden": x}
    return y, aux, info


def is_moe_layer(lcfg: Mapping, i: int) -> bool:
    return (
        lcfg["n_routed_experts"] is not None and i >= lcfg["first_k_dense_replace"] and i % lcfg["moe_layer_freq"] == 0
    )


# ----------------------------------------------------------------------------------------------------------------
# Whole model
# ----------------------------------------------------------------------------------------------------------------


def official_forward(
    ckpt_dir: str | None,
    batch: Mapping,
    *,
    config: Mapping | None = None,
    state_dict: Mapping | None = None,
    dtype: torch.dtype = torch.float32,
    strict: bool = True,
) -> dict:
    """Eval-mode ``DeepseekVLV2ForCausalLM.forward`` on ``batch`` (official processor layout).

    Returns ``{"logits" [B, T, V] fp32, "loss" (or None), "inputs_embeds", "hidden_states" (list: embeddings then
    each layer's output, before the final norm), "router" (list, one dict per MoE layer: layer, topk_idx,
    topk_weight, scores, margin, hidden)}``. Pass ``config``/``state_dict`` to skip reading ``ckpt_dir``.
    """
    cfg = densify_config(config) if config is not None else load_official_config(ckpt_dir)
    sd = state_dict if state_dict is not None else load_official_state_dict(ckpt_dir)
    sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
    lcfg = cfg["language_config"]
    vocab = sd["language.model.embed_tokens.weight"].shape[0]
    if vocab != lcfg["vocab_size"]:
        raise ValueError(f"embed_tokens has {vocab} rows, config vocab_size is {lcfg['vocab_size']}")
    with torch.no_grad():
        h = official_prepare_inputs_embeds(batch, sd, cfg, strict=strict)
        bsz, t, _ = h.shape
        attn = batch.get("attention_mask")
        pos = batch.get("position_ids")
        if pos is None:
            pos = torch.arange(t)[None]
        mask4d = causal_padding_mask(attn, bsz, t, h.dtype)
        eps = lcfg["rms_norm_eps"]
        hidden_states, router = [h], []
        i = 0
        while f"language.model.layers.{i}.input_layernorm.weight" in sd:
            lw = _sub(sd, f"language.model.layers.{i}.")
            x = official_rmsnorm(h, lw["input_layernorm.weight"], eps)
            attn_fn = official_mla_absorbed if lcfg["use_mla"] else official_mha
            h = h + attn_fn(x, _sub(lw, "self_attn."), lcfg, pos, mask4d)
            x = official_rmsnorm(h, lw["post_attention_layernorm.weight"], eps)
            if is_moe_layer(lcfg, i):
                y, _, info = official_moe(x, _sub(lw, "mlp."), lcfg)
                info["layer"] = i
                router.append(info)
            else:
                y = official_mlp(x, _sub(lw, "mlp."))
            h = h + y
            hidden_states.append(h)
            i += 1
        if i != lcfg["num_hidden_layers"]:
            raise ValueError(f"checkpoint has {i} LM layers, config says {lcfg['num_hidden_layers']}")
        h = official_rmsnorm(h, sd["language.model.norm.weight"], eps)
        logits = F.linear(h, sd["language.lm_head.weight"]).float()
        loss = None
        labels = batch.get("labels")
        if labels is not None:
            loss = F.cross_entropy(
                logits[..., :-1, :].reshape(-1, logits.shape[-1]), labels[..., 1:].reshape(-1), ignore_index=-100
            )
    return {
        "logits": logits,
        "loss": loss,
        "inputs_embeds": hidden_states[0],
        "hidden_states": hidden_states,
        "router": router,
    }


def official_logits(ckpt_dir: str, batch: Mapping) -> torch.Tensor:
    """fp32 logits [B, T, V] of the official eval forward, computed from the files in ``ckpt_dir``."""
    return official_forward(ckpt_dir, batch)["logits"]
