"""Scaled-down checkpoints in the layout the OFFICIAL ``save_pretrained`` writes (reference doc sections 2 and 3).

``write_official_checkpoint(out_dir, family)`` writes:

- ``config.json``, sparse like the released ones: top level ``model_type``, ``tile_tag``, ``global_view_pos``,
  ``candidate_resolutions``, ``vision_config``, ``projector_config``, ``language_config``, ``torch_dtype``,
  ``transformers_version``; the ``language_config`` holds only the keys the released variant sets, plus the
  keys whose scaled-down value must differ from the ``DeepseekV2Config`` default (as a user shrinking the model
  would write them). Everything else must come from the class defaults, so a loader has to apply them.
- ``model.safetensors`` (or shards ``model-0000i-of-0000N.safetensors`` + ``model.safetensors.index.json``) with
  exactly the official key names and shapes, including the unused ``vision.attn_pool.*`` and the junk-free
  ``image_newline`` / ``view_seperator`` (sic).

The tensors are stored as float32 so that fp32 logits can be compared at 1e-4, but every value is rounded to the
bfloat16 grid first (the released checkpoints are bf16), so loading in bf16 loses nothing.

Families (all: 3 LM layers, layer 0 dense, 8 routed experts top-2, 2 shared experts, ViT width 64 / 2 layers /
4 heads / mlp_ratio 3.7362):

- ``tiny``: like VL2-Tiny: Llama MHA (``use_mla: false``), greedy softmax router, bos 0 / eos 1,
  vision 70 px / patch 14 (5x5 patches, so the projector pads to 6x6).
- ``small``: like VL2-Small: MLA without q low-rank, greedy softmax, bos/eos left to the 100000/100001 defaults
  (they are not used by the forward), vision 64 px / patch 16.
- ``full``: like VL2 (27B): MLA, sigmoid + ``noaux_tc`` with ``e_score_correction_bias``, ``norm_topk_prob``,
  ``routed_scaling_factor`` 2.0, ``n_group`` 2 / ``topk_group`` 1 (so group selection matters; the release has
  1 / 1), and ``q_lora_rank`` 24 (the release has null) so the ``q_a_proj`` / ``q_a_layernorm`` / ``q_b_proj``
  path is exercised. Vision 56 px / patch 14 (4x4 patches, no pad). ``num_key_value_heads`` is left out like in
  the release, so it defaults to 32 while there are 4 heads: MLA never reads it.
"""

from __future__ import annotations

import copy
import json
import os

import torch
from safetensors.torch import save_file

from .forward import densify_config, is_moe_layer

FAMILIES = ("tiny", "small", "full")

# Mixed into the weight seed so that, with the default seeds (checkpoint 0, batch 0), no real token of the default
# batch has a near-tie in its expert choice (every routing margin > 2e-4, see ``forward._route_margin``): fp32
# re-implementations then pick the same experts as this reference.
_FAMILY_SALT = {"tiny": 2, "small": 0, "full": 0}

# The 23 released (w, h) candidate resolutions, as multiples of the 384 tile size.
_CANDIDATE_MULTIPLES = [
    (1, 1), (1, 2), (2, 1), (1, 3), (3, 1), (1, 4), (4, 1), (2, 2), (1, 5), (5, 1), (1, 6), (6, 1),
    (2, 3), (3, 2), (1, 7), (7, 1), (1, 8), (8, 1), (2, 4), (4, 2), (1, 9), (9, 1), (3, 3),
]  # fmt: skip

_AUTO_MAP = {
    "AutoConfig": "configuration_deepseek.DeepseekV2Config",
    "AutoModel": "modeling_deepseek.DeepseekV2Model",
    "AutoModelForCausalLM": "modeling_deepseek.DeepseekV2ForCausalLM",
}


def _vision(image_size: int, patch_size: int) -> dict:
    # Released: {model_name, model_type, layers, mlp_ratio, patch_size, width}; image_size and heads are added
    # because the scaled values differ from the VisionEncoderConfig defaults (384 / 16). model_name is not read
    # by the VL2 model (it builds VisionTransformer from the fields), so the released name is kept.
    return {
        "heads": 4,
        "image_size": image_size,
        "layers": 2,
        "mlp_ratio": 3.7362,
        "model_name": "siglip_so400m_patch14_384",
        "model_type": "vision",
        "patch_size": patch_size,
        "width": 64,
    }


def _language_common() -> dict:
    return {"architectures": ["DeepseekV2ForCausalLM"], "auto_map": dict(_AUTO_MAP), "model_type": "deepseek_v2"}


def sparse_config(family: str) -> dict:
    """The sparse config.json content for ``family`` (what is written to disk)."""
    if family == "tiny":
        n_embed, image_size, patch = 64, 70, 14
        lang = {
            # keys of the released tiny config (scaled values)
            "bos_token_id": 0,
            "eos_token_id": 1,
            "first_k_dense_replace": 1,
            "hidden_size": 64,
            "intermediate_size": 128,
            "kv_lora_rank": None,
            "lm_head": True,
            "max_position_embeddings": 4096,
            "moe_intermediate_size": 32,
            "n_group": 1,
            "n_routed_experts": 8,
            "n_shared_experts": 2,
            "num_attention_heads": 4,
            "num_experts_per_tok": 2,
            "num_hidden_layers": 3,
            "num_key_value_heads": 4,
            "q_lora_rank": None,
            "qk_nope_head_dim": 0,
            "qk_rope_head_dim": 0,
            "rm_head": False,
            "topk_group": 1,
            "topk_method": "greedy",
            "torch_dtype": "bfloat16",
            "use_mla": False,
            "v_head_dim": 0,
            "vocab_size": 300,
        }
    elif family == "small":
        n_embed, image_size, patch = 64, 64, 16
        lang = {
            # keys of the released small config (scaled values); no bos/eos, no use_mla, no scoring_func ...
            "first_k_dense_replace": 1,
            "hidden_size": 64,
            "intermediate_size": 160,
            "lm_head": True,
            "max_position_embeddings": 4096,
            "moe_intermediate_size": 24,
            "n_group": 1,
            "n_routed_experts": 8,
            "n_shared_experts": 2,
            "num_attention_heads": 4,
            "num_experts_per_tok": 2,
            "num_hidden_layers": 3,
            "num_key_value_heads": 4,
            "q_lora_rank": None,
            "topk_group": 1,
            "topk_method": "greedy",
            "torch_dtype": "bfloat16",
            "vocab_size": 320,
            # not in the release (defaults 512 / 128 / 64 / 128 there): scaled values must be explicit
            "kv_lora_rank": 32,
            "qk_nope_head_dim": 16,
            "qk_rope_head_dim": 8,
            "v_head_dim": 12,
        }
    elif family == "full":
        n_embed, image_size, patch = 80, 56, 14
        lang = {
            # keys of the released full config (scaled values)
            "bos_token_id": 0,
            "eos_token_id": 1,
            "first_k_dense_replace": 1,
            "hidden_size": 80,
            "intermediate_size": 192,
            "lm_head": False,
            "max_position_embeddings": 4096,
            "moe_intermediate_size": 40,
            "n_group": 2,  # released: 1 (deliberate deviation: makes group selection matter)
            "n_routed_experts": 8,
            "n_shared_experts": 2,
            "norm_topk_prob": True,
            "num_experts_per_tok": 2,
            "q_lora_rank": 24,  # released: null (deliberate deviation: exercises q_a_proj/q_a_layernorm/q_b_proj)
            "rm_head": False,
            "routed_scaling_factor": 2.0,
            "scoring_func": "sigmoid",
            "topk_group": 1,
            "topk_method": "noaux_tc",
            "torch_dtype": "bfloat16",
            "vocab_size": 300,
            # not in the release (defaults 30 layers / 32 heads / 512 / 128 / 64 / 128): scaled, so explicit.
            # num_key_value_heads stays out, as in the release (default 32, unused by MLA).
            "num_hidden_layers": 3,
            "num_attention_heads": 4,
            "kv_lora_rank": 32,
            "qk_nope_head_dim": 16,
            "qk_rope_head_dim": 8,
            "v_head_dim": 20,
        }
    else:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
    lang = {**_language_common(), **lang}
    return {
        "candidate_resolutions": [[image_size * a, image_size * b] for a, b in _CANDIDATE_MULTIPLES],
        "global_view_pos": "head",
        "language_config": dict(sorted(lang.items())),
        "model_type": "deepseek_vl_v2",
        # released: {model_type, n_embed}; input_dim added because the scaled ViT width (64) is not 1152
        "projector_config": {"input_dim": 64, "model_type": "mlp_projector", "n_embed": n_embed},
        "tile_tag": "2D",
        "torch_dtype": "bfloat16",
        "transformers_version": "4.38.2",
        "vision_config": _vision(image_size, patch),
    }


# ----------------------------------------------------------------------------------------------------------------
# Weights
# ----------------------------------------------------------------------------------------------------------------


class _Init:
    """Deterministic random tensors, rounded to the bf16 grid, stored as fp32."""

    def __init__(self, seed: int):
        self.g = torch.Generator().manual_seed(seed)

    def _round(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(torch.bfloat16).to(torch.float32).contiguous()

    def normal(self, *shape: int, std: float = 1.0, mean: float = 0.0) -> torch.Tensor:
        return self._round(torch.randn(*shape, generator=self.g) * std + mean)

    def linear(self, out_f: int, in_f: int, gain: float = 1.0) -> torch.Tensor:
        return self.normal(out_f, in_f, std=gain / in_f**0.5)

    def norm(self, n: int) -> torch.Tensor:  # norm weights around 1 with noise
        return self.normal(n, std=0.1, mean=1.0)

    def uniform(self, n: int, lo: float, hi: float) -> torch.Tensor:
        return self._round(torch.rand(n, generator=self.g) * (hi - lo) + lo)


def _vision_weights(init: _Init, vcfg: dict) -> dict:
    width, patch, size = vcfg["width"], vcfg["patch_size"], vcfg["image_size"]
    hidden = int(width * vcfg["mlp_ratio"])  # timm Mlp: int(dim * mlp_ratio)
    n_patches = (size // patch) ** 2
    sd = {
        "vision.pos_embed": init.normal(1, n_patches, width, std=0.1),
        "vision.patch_embed.proj.weight": init.normal(width, 3, patch, patch, std=1.0 / (3 * patch * patch) ** 0.5),
        "vision.patch_embed.proj.bias": init.normal(width, std=0.02),
    }
    for i in range(vcfg["layers"]):
        p = f"vision.blocks.{i}."
        sd.update(
            {
                p + "norm1.weight": init.norm(width),
                p + "norm1.bias": init.normal(width, std=0.05),
                p + "attn.qkv.weight": init.linear(3 * width, width),
                p + "attn.qkv.bias": init.normal(3 * width, std=0.05),
                p + "attn.proj.weight": init.linear(width, width, gain=0.5),
                p + "attn.proj.bias": init.normal(width, std=0.02),
                p + "norm2.weight": init.norm(width),
                p + "norm2.bias": init.normal(width, std=0.05),
                p + "mlp.fc1.weight": init.linear(hidden, width),
                p + "mlp.fc1.bias": init.normal(hidden, std=0.05),
                p + "mlp.fc2.weight": init.linear(width, hidden, gain=0.5),
                p + "mlp.fc2.bias": init.normal(width, std=0.02),
            }
        )
    sd["vision.norm.weight"] = init.norm(width)
    sd["vision.norm.bias"] = init.normal(width, std=0.05)
    # timm AttentionPoolLatent(width, num_heads, mlp_ratio, norm_layer=LayerNorm): present, never run.
    p = "vision.attn_pool."
    sd.update(
        {
            p + "latent": init.normal(1, 1, width, std=width**-0.5),
            p + "q.weight": init.linear(width, width),
            p + "q.bias": init.normal(width, std=0.02),
            p + "kv.weight": init.linear(2 * width, width),
            p + "kv.bias": init.normal(2 * width, std=0.02),
            p + "proj.weight": init.linear(width, width),
            p + "proj.bias": init.normal(width, std=0.02),
            p + "norm.weight": init.norm(width),
            p + "norm.bias": init.normal(width, std=0.05),
            p + "mlp.fc1.weight": init.linear(hidden, width),
            p + "mlp.fc1.bias": init.normal(hidden, std=0.02),
            p + "mlp.fc2.weight": init.linear(width, hidden),
            p + "mlp.fc2.bias": init.normal(width, std=0.02),
        }
    )
    return sd


def _mlp(init: _Init, prefix: str, hidden: int, inter: int) -> dict:
    return {
        prefix + "gate_proj.weight": init.linear(inter, hidden),
        prefix + "up_proj.weight": init.linear(inter, hidden),
        prefix + "down_proj.weight": init.linear(hidden, inter, gain=0.5),
    }


def _language_weights(init: _Init, lcfg: dict) -> dict:
    hid, vocab, n_heads = lcfg["hidden_size"], lcfg["vocab_size"], lcfg["num_attention_heads"]
    bias = lcfg["attention_bias"]
    sd = {"language.model.embed_tokens.weight": init.normal(vocab, hid, std=0.5)}
    for i in range(lcfg["num_hidden_layers"]):
        p = f"language.model.layers.{i}."
        sd[p + "input_layernorm.weight"] = init.norm(hid)
        a = p + "self_attn."
        if lcfg["use_mla"]:
            nope, rope, vdim = lcfg["qk_nope_head_dim"], lcfg["qk_rope_head_dim"], lcfg["v_head_dim"]
            rank, qdim = lcfg["kv_lora_rank"], n_heads * (lcfg["qk_nope_head_dim"] + lcfg["qk_rope_head_dim"])
            if lcfg["q_lora_rank"] is None:
                sd[a + "q_proj.weight"] = init.linear(qdim, hid)
            else:
                sd[a + "q_a_proj.weight"] = init.linear(lcfg["q_lora_rank"], hid)
                if bias:
                    sd[a + "q_a_proj.bias"] = init.normal(lcfg["q_lora_rank"], std=0.02)
                sd[a + "q_a_layernorm.weight"] = init.norm(lcfg["q_lora_rank"])
                sd[a + "q_b_proj.weight"] = init.linear(qdim, lcfg["q_lora_rank"])
            sd[a + "kv_a_proj_with_mqa.weight"] = init.linear(rank + rope, hid)
            if bias:
                sd[a + "kv_a_proj_with_mqa.bias"] = init.normal(rank + rope, std=0.02)
            sd[a + "kv_a_layernorm.weight"] = init.norm(rank)
            sd[a + "kv_b_proj.weight"] = init.linear(n_heads * (nope + vdim), rank)
            sd[a + "o_proj.weight"] = init.linear(hid, n_heads * vdim, gain=0.5)
            if bias:
                sd[a + "o_proj.bias"] = init.normal(hid, std=0.02)
        else:
            hd, n_kv = hid // n_heads, lcfg["num_key_value_heads"]
            for name, out_f in (("q_proj", n_heads * hd), ("k_proj", n_kv * hd), ("v_proj", n_kv * hd)):
                sd[a + name + ".weight"] = init.linear(out_f, hid)
                if bias:
                    sd[a + name + ".bias"] = init.normal(out_f, std=0.02)
            sd[a + "o_proj.weight"] = init.linear(hid, n_heads * hd, gain=0.5)
            if bias:
                sd[a + "o_proj.bias"] = init.normal(hid, std=0.02)
        sd[p + "post_attention_layernorm.weight"] = init.norm(hid)
        m = p + "mlp."
        if is_moe_layer(lcfg, i):
            n_exp, inter = lcfg["n_routed_experts"], lcfg["moe_intermediate_size"]
            # router logits with std ~2 on RMS-normed inputs: routing is clearly non-uniform
            sd[m + "gate.weight"] = init.linear(n_exp, hid, gain=2.0)
            if lcfg["topk_method"] == "noaux_tc":
                # visible spread, kept positive so that biased scores never fall below the 0.0 the official
                # group mask fills in (that official quirk is then never what decides the selection)
                sd[m + "gate.e_score_correction_bias"] = init.uniform(n_exp, 0.02, 0.35)
            for e in range(n_exp):
                sd.update(_mlp(init, f"{m}experts.{e}.", hid, inter))
            if lcfg["n_shared_experts"] is not None:
                sd.update(_mlp(init, m + "shared_experts.", hid, inter * lcfg["n_shared_experts"]))
        else:
            sd.update(_mlp(init, m, hid, lcfg["intermediate_size"]))
    sd["language.model.norm.weight"] = init.norm(hid)
    sd["language.lm_head.weight"] = init.linear(vocab, hid)
    return sd


def make_official_state_dict(dense_config: dict, seed: int = 0) -> dict:
    """All official keys for ``dense_config`` (vision, projector, specials, language), deterministic in ``seed``."""
    cfg = densify_config(dense_config)
    init = _Init(seed)
    sd = _vision_weights(init, cfg["vision_config"])
    pcfg = cfg["projector_config"]
    r, n_embed = pcfg["downsample_ratio"], pcfg["n_embed"]
    mid = n_embed * pcfg["mlp_ratio"]
    dims = [pcfg["input_dim"] * r * r] + [mid] * (pcfg["depth"] - 1) + [n_embed]
    for j in range(pcfg["depth"]):
        sd[f"projector.layers.{2 * j}.weight"] = init.linear(dims[j + 1], dims[j])
        sd[f"projector.layers.{2 * j}.bias"] = init.normal(dims[j + 1], std=0.05)
    # tile_tag "2D": newline and separator embeddings (randn(n_embed) / sqrt(n_embed) upstream; larger here)
    sd["image_newline"] = init.normal(n_embed, std=0.5)
    sd["view_seperator"] = init.normal(n_embed, std=0.5)
    sd.update(_language_weights(init, cfg["language_config"]))
    return sd


def _shard_groups(keys: list[str]) -> list[list[str]]:
    """vision + projector + specials | first half of the LM | the rest (3 shards, HF-style contiguous split)."""
    lm = [k for k in keys if k.startswith("language.")]
    other = [k for k in keys if not k.startswith("language.")]
    half = len(lm) // 2
    return [other, lm[:half], lm[half:]]


def write_official_checkpoint(
    out_dir: str,
    family: str,
    seed: int = 0,
    sharded: bool = False,
    language_overrides: dict | None = None,
) -> dict:
    """Write ``config.json`` + safetensors for ``family`` into ``out_dir``; return the dense config used.

    ``language_overrides`` updates the sparse ``language_config`` before writing (a value of ``...`` deletes the
    key), e.g. ``{"rope_scaling": {...}}`` or ``{"moe_layer_freq": 2}``; weight shapes follow the result.
    """
    sparse = sparse_config(family)
    if language_overrides:
        for k, v in language_overrides.items():
            if v is ...:
                sparse["language_config"].pop(k, None)
            else:
                sparse["language_config"][k] = copy.deepcopy(v)
        sparse["language_config"] = dict(sorted(sparse["language_config"].items()))
    dense = densify_config(sparse)
    sd = make_official_state_dict(dense, seed=1000 * seed + _FAMILY_SALT[family])
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(sparse, f, indent=2)
        f.write("\n")
    meta = {"format": "pt"}
    if not sharded:
        save_file(sd, os.path.join(out_dir, "model.safetensors"), metadata=meta)
    else:
        groups = _shard_groups(list(sd))
        n = len(groups)
        weight_map, total = {}, 0
        for j, keys in enumerate(groups, start=1):
            name = f"model-{j:05d}-of-{n:05d}.safetensors"
            save_file({k: sd[k] for k in keys}, os.path.join(out_dir, name), metadata=meta)
            for k in keys:
                weight_map[k] = name
                total += sd[k].numel() * sd[k].element_size()
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
            json.dump(index, f, indent=2)
            f.write("\n")
    return dense
