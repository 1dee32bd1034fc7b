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
import shutil
import tempfile
from pathlib import Path

import torch

from .config import RELEASED, RELEASED_DIR, VL2Config
from .processor_config import candidate_resolutions
from .shards import DEFAULT_MAX_SHARD_SIZE, ShardWriter

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


def random_value(name: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """One parameter's deterministic random value (fp32, on `gen`'s device) with O(1) activations: norms 1,
    biases 0, matrices N(0, 0.05²) (the router 0.3, for non-trivial routing), drawn from `gen`."""
    leaf, device = name.rsplit(".", 1)[-1], gen.device
    if "norm" in name and leaf in ("weight", "bias"):
        return torch.full(shape, 1.0 if leaf == "weight" else 0.0, device=device)
    if leaf == "bias":
        return torch.zeros(shape, device=device)
    if name.endswith("e_score_correction_bias"):
        return torch.randn(shape, generator=gen, device=device) * 0.05
    if name.endswith("mlp.gate.weight"):
        return torch.randn(shape, generator=gen, device=device) * 0.3  # non-trivial routing
    if name in ("image_newline", "view_seperator"):
        return torch.randn(shape, generator=gen, device=device) / shape[0] ** 0.5
    return torch.randn(shape, generator=gen, device=device) * 0.05


def _init_random(model: torch.nn.Module, seed: int) -> None:
    """`random_value` for every parameter, in name order from one generator (what the checkpoints hold)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            p.copy_(random_value(name, tuple(p.shape), gen))


def write_random_checkpoint(
    out_dir: str | Path,
    raw_config: dict,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    extra_files=(),
    device: str = "cpu",
) -> Path:
    """A checkpoint directory in the official layout (config.json, safetensors with per-expert keys, in Hub-sized
    shards with an index above `max_shard_size`, plus `extra_files` such as the tokenizer) holding `random_value`'s
    weights for the architecture `raw_config` describes, in `dtype`. Written a tensor at a time (shards.ShardWriter),
    so a full-size model is never in memory; atomically (a temp dir, then renamed). The values are drawn on `device`
    (a GPU draws billions in a second; the values then differ from the CPU's)."""
    from .checkpoint import CONFIG_NAME, make_temp_dir, official_shapes, replace_dir, to_official
    from .deepseek_vl2 import DeepseekVL2ForCausalLM

    with torch.device("meta"):  # names and shapes only
        model = DeepseekVL2ForCausalLM(VL2Config.from_dict(raw_config, source="random checkpoint config"))
    specs = {key: (shape, dtype) for key, shape in official_shapes(model).items()}
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(out_dir.parent, f".{out_dir.name}.tmp-")
    try:
        (tmp / CONFIG_NAME).write_text(json.dumps(raw_config, indent=2) + "\n")
        gen = torch.Generator(device).manual_seed(seed)
        writer = ShardWriter(tmp, specs, max_shard_size)
        try:
            for name, p in sorted(model.named_parameters()):  # name order: one generator, as _init_random draws
                value = random_value(name, tuple(p.shape), gen).to(dtype).cpu()
                for key, tensor in to_official({name: value}).items():
                    writer.write(key, tensor)
        except BaseException:
            writer.abort()
            raise
        writer.close()
        for f in extra_files:
            shutil.copy2(f, tmp / Path(f).name)
        replace_dir(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def make_tiny_checkpoint(out_dir: str | Path, family: str, seed: int = 0) -> Path:
    """Write a complete checkpoint directory (config, weights, tokenizer, processor config), atomically."""
    from .processor_config import write_processor_config
    from .tokenizer import write_tokenizer

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out_dir.name}.extra-", dir=out_dir.parent) as extra:
        vocab_size = write_tokenizer(extra)
        raw = family_config(family, vocab_size)
        vision = raw["vision_config"]
        write_processor_config(extra, image_size=vision["image_size"], patch_size=vision["patch_size"])
        write_random_checkpoint(out_dir, raw, seed, extra_files=sorted(Path(extra).iterdir()))
    return out_dir


def make_released_random_checkpoint(
    out_dir: str | Path,
    released: str = "deepseek-vl2-tiny",
    layers: int | None = None,
    vision_layers: int | None = None,
    seed: int = 0,
    dtype: torch.dtype = torch.bfloat16,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    device: str | None = None,
) -> Path:
    """A released model at full size with random weights, in the official layout: the shipped config.json (its
    `layers` / `vision_layers` optionally cut, widths unchanged) and processor_config.json, the tiny tokenizer
    (its ids are a subset of the real vocabulary), bf16 weights in shards. For runs of the real shapes (GPU
    end-to-end tests, benchmarks) where the real weights cannot be downloaded. Drawn on the GPU when there is one
    (`device`)."""
    from .tokenizer import write_tokenizer

    if released not in RELEASED:
        raise ValueError(f"released={released!r}: the shipped configs are {', '.join(RELEASED)}")
    raw = json.loads((RELEASED_DIR / released / "config.json").read_text())
    if layers is not None:
        raw["language_config"]["num_hidden_layers"] = layers
    if vision_layers is not None:
        raw["vision_config"]["layers"] = vision_layers
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out_dir.name}.extra-", dir=out_dir.parent) as extra:
        write_tokenizer(extra)
        shutil.copy2(RELEASED_DIR / released / "processor_config.json", extra)
        files = sorted(Path(extra).iterdir())
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        return write_random_checkpoint(out_dir, raw, seed, dtype, max_shard_size, files, device)


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
