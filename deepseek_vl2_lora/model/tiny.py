"""Tiny random DeepSeek-VL2 checkpoints in the official layout, for tests and the embedded default experiment.

Three shape families mirror the released variants, scaled down:
- `tiny-mha`    like VL2-Tiny: Llama-style MHA (`use_mla: false`), greedy softmax router;
- `small-mla`   like VL2-Small: MLA without the q low-rank path, greedy softmax router, projector pad path
                (5×5 patches per tile);
- `full-noaux`  like VL2 (27B): MLA, sigmoid `noaux_tc` router with correction bias, 2 groups, normalised
                top-k, scaling 2.0. It also sets `q_lora_rank` (the released full config does not) so the
                `q_a_proj`/`q_b_proj` path is exercised.
Each directory holds `config.json`, `model.safetensors`, `processor_config.json` and a tokenizer, exactly as a
real checkpoint directory does, and is deterministic for a given family and seed.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch

from .config import VL2Config
from .processor_config import candidate_resolutions

_VISION = {
    "model_type": "vision",
    "model_name": "siglip_so400m_patch14_384",
    "width": 64,
    "layers": 2,
    "heads": 4,
    "mlp_ratio": 3.7362,
}
_LM = {
    "model_type": "deepseek_v2",
    "hidden_size": 64,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "intermediate_size": 128,
    "moe_intermediate_size": 32,
    "n_routed_experts": 8,
    "n_shared_experts": 2,
    "num_experts_per_tok": 2,
    "first_k_dense_replace": 1,
    "moe_layer_freq": 1,
    "n_group": 1,
    "topk_group": 1,
    "topk_method": "greedy",
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "bos_token_id": 0,
    "eos_token_id": 1,
}
_MLA = {
    "use_mla": True,
    "kv_lora_rank": 32,
    "q_lora_rank": None,
    "qk_nope_head_dim": 16,
    "qk_rope_head_dim": 8,
    "v_head_dim": 16,
}

FAMILIES: dict[str, dict] = {
    "tiny-mha": {
        "vision": {**_VISION, "image_size": 64, "patch_size": 16},
        "language": {
            **_LM,
            "use_mla": False,
            "kv_lora_rank": None,
            "q_lora_rank": None,
            "qk_nope_head_dim": 0,
            "qk_rope_head_dim": 0,
            "v_head_dim": 0,
        },
    },
    "small-mla": {
        "vision": {**_VISION, "image_size": 70, "patch_size": 14},
        "language": {**_LM, **_MLA},
    },
    "full-noaux": {
        "vision": {**_VISION, "image_size": 64, "patch_size": 16},
        "language": {
            **_LM,
            **_MLA,
            "q_lora_rank": 24,
            "topk_method": "noaux_tc",
            "scoring_func": "sigmoid",
            "n_group": 2,
            "topk_group": 1,
            "norm_topk_prob": True,
            "routed_scaling_factor": 2.0,
        },
    },
}
GENERATOR_VERSION = 1  # bump when the weights or files written here change, to invalidate caches


def family_config(family: str, vocab_size: int) -> dict:
    if family not in FAMILIES:
        raise ValueError(f"unknown tiny family {family!r}; choose from {sorted(FAMILIES)}")
    spec = copy.deepcopy(FAMILIES[family])
    tile = spec["vision"]["image_size"]
    hidden = spec["language"]["hidden_size"]
    return {
        "model_type": "deepseek_vl_v2",
        "tile_tag": "2D",
        "global_view_pos": "head",
        "candidate_resolutions": candidate_resolutions(tile),
        "vision_config": spec["vision"],
        "projector_config": {
            "model_type": "mlp_projector",
            "n_embed": hidden,
            "input_dim": spec["vision"]["width"],
        },
        "language_config": {**spec["language"], "vocab_size": vocab_size},
        "torch_dtype": "float32",
    }


def _init_random(model: torch.nn.Module, seed: int) -> None:
    """Deterministic weights with O(1) activations: norms 1, biases 0, matrices N(0, 0.02·k)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            leaf = name.rsplit(".", 1)[-1]
            if "norm" in name and leaf in ("weight", "bias"):
                p.fill_(1.0 if leaf == "weight" else 0.0)
            elif leaf == "bias":
                p.zero_()
            elif name.endswith("e_score_correction_bias"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
            elif name.endswith("mlp.gate.weight"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)  # non-trivial routing
            elif name in ("image_newline", "view_seperator"):
                p.copy_(torch.randn(p.shape, generator=gen) / p.shape[0] ** 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)


def make_tiny_checkpoint(out_dir: str | Path, family: str, seed: int = 0) -> Path:
    """Write a complete checkpoint directory (config, weights, tokenizer, processor config), atomically."""
    from .deepseek_vl2 import DeepseekVL2ForCausalLM
    from .processor_config import write_processor_config
    from .tokenizer import write_tokenizer

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out_dir.name}.extra-", dir=out_dir.parent) as extra:
        vocab_size = write_tokenizer(extra)
        raw = family_config(family, vocab_size)
        vision = raw["vision_config"]
        write_processor_config(extra, image_size=vision["image_size"], patch_size=vision["patch_size"])
        with torch.random.fork_rng():  # the caller's random stream stays as it was
            torch.manual_seed(seed)
            model = DeepseekVL2ForCausalLM(VL2Config.from_dict(raw, source=f"tiny family {family}"))
            _init_random(model, seed)
        # save_pretrained writes the whole directory (weights + these files) to a temp dir and renames it
        model.save_pretrained(out_dir, extra_files=sorted(Path(extra).iterdir()))
    return out_dir


def cache_root() -> Path:
    return Path(os.environ.get("DEEPSEEK_VL2_LORA_CACHE", Path.home() / ".cache" / "deepseek_vl2_lora"))


def ensure_tiny_checkpoint(family: str, seed: int = 0, root: str | Path | None = None) -> Path:
    """The cached tiny checkpoint for `family`, generated on first use."""
    key = json.dumps({"family": FAMILIES.get(family), "seed": seed, "v": GENERATOR_VERSION}, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:10]
    path = Path(root or cache_root()) / "tiny" / f"{family}-s{seed}-{digest}"
    if not (path / "config.json").exists():
        make_tiny_checkpoint(path, family, seed)
    return path
