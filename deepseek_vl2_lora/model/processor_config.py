"""processor_config.json, the checkpoint file the DeepSeek-VL2 processor is built from: the candidate resolutions of
the anyres tiling, patch size and downsampling (which fix the image token count), normalisation; written for tiny
checkpoints, validated on load (data/processor.py)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from .tokenizer import IMAGE_TOKEN, PAD_TOKEN

PROCESSOR_CONFIG_NAME = "processor_config.json"


class ProcessorConfigError(ValueError):
    """processor_config.json or the tokenizer next to it is missing or invalid."""


def candidate_resolutions(image_size: int, candidate_grid: int = 9) -> list[list[int]]:
    """All [image_size*m, image_size*n] with m*n <= candidate_grid, in the order of the released configs.

    The released list (for 384 and grid 9) is sorted by tile count m*n, then puts the thin layouts first
    (smaller min(m, n)), then the narrower one (smaller m) first: [1,1], [1,2], [2,1], [1,3], [3,1], [1,4],
    [4,1], [2,2], ...
    """
    sides = range(1, candidate_grid + 1)
    grids = [(m, n) for m in sides for n in sides if m * n <= candidate_grid]
    grids.sort(key=lambda mn: (mn[0] * mn[1], min(mn), mn[0]))
    return [[image_size * m, image_size * n] for m, n in grids]


def image_token_count(image_size: int, patch_size: int, downsample_ratio: int, width_tiles: int, height_tiles: int):
    """Tokens of one image: global view rows + newlines, one view separator, local grid rows + newlines."""
    h = w = math.ceil((image_size // patch_size) / downsample_ratio)
    return h * (w + 1) + 1 + (h * height_tiles) * (w * width_tiles + 1)


def write_processor_config(
    out_dir: str | Path,
    image_size: int,
    patch_size: int,
    downsample_ratio: int = 2,
    candidate_grid: int = 9,
    **overrides: Any,
) -> Path:
    """Write a processor_config.json shaped like the released one; return its path."""
    config = {
        "processor_class": "DeepseekVLV2Processor",
        "candidate_resolutions": candidate_resolutions(image_size, candidate_grid),
        "patch_size": patch_size,
        "downsample_ratio": downsample_ratio,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
        "normalize": True,
        "image_token": IMAGE_TOKEN,
        "pad_token": PAD_TOKEN,
        "add_special_token": False,
        "sft_format": "deepseek",
        "ignore_id": -100,
        # The released file most likely says false here. It does not matter for us: `encode` always masks the
        # prompt (SFT masking is forced through its `mask_prompt=True` argument, not read from this file).
        "mask_prompt": True,
    }
    config.update(overrides)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / PROCESSOR_CONFIG_NAME
    path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


def _is_pos_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x > 0


def check_processor_config(config: Any, path: Path) -> dict:
    """Check the keys the processor depends on; every message names the file."""

    def fail(msg: str) -> ProcessorConfigError:
        return ProcessorConfigError(f"{path}: {msg}")

    if not isinstance(config, dict):
        raise fail("expected a JSON object")
    for key in ("candidate_resolutions", "patch_size", "downsample_ratio"):
        if key not in config:
            raise fail(f"missing required key {key!r}")
    res = config["candidate_resolutions"]
    if not isinstance(res, list) or not res:
        raise fail("'candidate_resolutions' must be a non-empty list of [width, height]")
    for pair in res:
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(_is_pos_int(v) for v in pair)):
            raise fail(f"bad entry in 'candidate_resolutions': {pair!r}")
    tile = res[0][0]
    if any(w % tile or h % tile for w, h in res):
        raise fail(f"every candidate resolution must be a multiple of the tile size {tile}")
    for key in ("patch_size", "downsample_ratio"):
        if not _is_pos_int(config[key]):
            raise fail(f"{key!r} must be a positive integer, got {config[key]!r}")
    for key in ("image_mean", "image_std"):
        val = config.get(key, [0.5, 0.5, 0.5])
        if not (isinstance(val, list) and len(val) == 3 and all(isinstance(v, (int, float)) for v in val)):
            raise fail(f"{key!r} must be a list of 3 numbers")
    if config.get("sft_format", "deepseek") != "deepseek":
        raise fail(f"only sft_format 'deepseek' is supported, got {config['sft_format']!r}")
    return config
