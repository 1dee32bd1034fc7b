"""Image tiling as the official processor does it: the anyres choice of a resolution, the global view and the
local tiles as normalised tensors, and the content key of a tile (the vision feature cache's)."""

from __future__ import annotations

import hashlib
import json
import math

import numpy as np
import torch
from PIL import Image, ImageOps


def select_best_resolution(image_size: tuple[int, int], resolutions: list[list[int]]) -> tuple[int, int]:
    """Anyres choice (LLaVA-NeXT rule, as in the official processor).

    Each candidate (w, h) is scored by how many original pixels survive an aspect-preserving fit into it; the
    highest score wins and ties go to the candidate with the least unused area. Candidates are visited in
    config order and only strictly better ones replace the current choice.
    """
    width, height = image_size
    best, best_effective, best_wasted = None, -1, math.inf
    for cand_w, cand_h in resolutions:
        scale = min(cand_w / width, cand_h / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        wasted = cand_w * cand_h - effective
        if effective > best_effective or (effective == best_effective and wasted < best_wasted):
            best, best_effective, best_wasted = (cand_w, cand_h), effective, wasted
    return best


def image_to_tensor(image: Image.Image, mean, std, normalize: bool = True) -> torch.Tensor:
    """ToTensor + Normalize(mean, std) with torchvision's arithmetic: uint8 -> float32 / 255, then (x-m)/s."""
    x = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).contiguous()
    x = x.to(torch.float32).div(255)
    if normalize:
        m = torch.as_tensor(mean, dtype=torch.float32)[:, None, None]
        s = torch.as_tensor(std, dtype=torch.float32)[:, None, None]
        x = x.sub(m).div(s)
    return x


def tile_image(
    image: Image.Image, best_size: tuple[int, int], tile: int, mean, std, normalize: bool = True
) -> list[torch.Tensor]:
    """[global view, local tiles row-major] as [3, tile, tile] tensors; padding takes the mean colour."""
    if image.mode != "RGB":
        image = image.convert("RGB")
    colour = tuple(int(x * 255) for x in mean)
    global_view = ImageOps.pad(image, (tile, tile), color=colour)
    tiles = [image_to_tensor(global_view, mean, std, normalize)]
    best_w, best_h = best_size
    local = global_view if best_size == (tile, tile) else ImageOps.pad(image, best_size, color=colour)
    for top in range(0, best_h, tile):
        for left in range(0, best_w, tile):
            tiles.append(image_to_tensor(local.crop((left, top, left + tile, top + tile)), mean, std, normalize))
    return tiles


def tile_key(tile: torch.Tensor) -> str:
    """Content hash of one preprocessed tile [3, H, W] (the vision feature cache's key)."""
    t = tile.detach().to("cpu", torch.float32).contiguous()
    return hashlib.sha256(json.dumps(list(t.shape)).encode() + t.numpy().tobytes()).hexdigest()
