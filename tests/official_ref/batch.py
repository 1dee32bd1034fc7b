"""A batch in the layout of the official ``DeepseekVLV2Processor`` (right padding), built without a tokenizer.

Keys (reference doc section 4, ``batchify``): ``input_ids [B, T]``, ``attention_mask [B, T]``,
``images [B, max_tiles, 3, S, S]`` (zero-padded), ``images_seq_mask [B, T]`` (bool),
``images_spatial_crop [B, max_images, 2]`` (rows ``[num_width_tiles, num_height_tiles]``, zero-padded),
``labels [B, T]`` (-100 on prompt, images and padding; NOT shifted, the model shifts), ``position_ids [B, T]``.

Per image the tiles are: 1 global view, then ``tw * th`` local tiles in row-major order, and the image occupies
``h*(w+1) + 1 + (h*th)*(w*tw+1)`` positions with ``h = w = ceil((S // patch) / downsample_ratio)``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from .forward import densify_config

IGNORE_ID = -100
PAD_ID = 2  # any id; padded positions are masked out (ids in [3, vocab) are used for text)


def image_grid_size(image_size: int, patch_size: int, downsample_ratio: int = 2) -> int:
    """Side of the projector's token grid for one tile: ``ceil((S // patch) / ratio)``."""
    return math.ceil((image_size // patch_size) / downsample_ratio)


def num_image_tokens(
    image_size: int, patch_size: int, num_width_tiles: int, num_height_tiles: int, downsample_ratio: int = 2
) -> int:
    """Positions one image takes in the sequence (processor ``tokenize_with_images``)."""
    h = w = image_grid_size(image_size, patch_size, downsample_ratio)
    return h * (w + 1) + 1 + (h * num_height_tiles) * (w * num_width_tiles + 1)


def image_token_id(config: Mapping) -> int:
    """The placeholder id put at image positions (``vocab_size - 1``; ``images_seq_mask`` is what counts)."""
    return densify_config(config)["language_config"]["vocab_size"] - 1


def make_official_batch(config: Mapping, seed: int = 0, sample1_image: bool = True, extra_pad: int = 0) -> dict:
    """Two right-padded samples for the model described by ``config`` (dense or sparse top-level config).

    - sample 0: text, image A (tw=2, th=1), text, image B (tw=1, th=2), prompt text, answer (labelled);
    - sample 1: text, one 1x1 image (or no image when ``sample1_image=False``), prompt text, shorter answer.

    ``extra_pad`` appends that many extra padding columns (the real tokens must not change).
    Only tensors are returned (so ``model(**batch)`` works); image positions hold ``image_token_id(config)``.
    """
    cfg = densify_config(config)
    vcfg, pcfg, lcfg = cfg["vision_config"], cfg["projector_config"], cfg["language_config"]
    size, patch, ratio = vcfg["image_size"], vcfg["patch_size"], pcfg["downsample_ratio"]
    vocab = lcfg["vocab_size"]
    image_tok = image_token_id(cfg)
    g = torch.Generator().manual_seed(seed)

    def text(n: int) -> list[int]:
        return torch.randint(3, vocab - 1, (n,), generator=g).tolist()

    # (kind, payload): "t" prompt text (n), "i" image (tw, th), "a" answer text (n)
    plans = [
        [("t", 3), ("i", (2, 1)), ("t", 2), ("i", (1, 2)), ("t", 4), ("a", 5)],
        [("t", 2), ("i", (1, 1)), ("t", 3), ("a", 3)] if sample1_image else [("t", 6), ("a", 4)],
    ]
    seqs, img_masks, labels, crops, tiles = [], [], [], [], []
    for plan in plans:
        ids, im, lab, cr, tl = [], [], [], [], []
        for kind, payload in plan:
            if kind == "i":
                tw, th = payload
                n = num_image_tokens(size, patch, tw, th, ratio)
                ids += [image_tok] * n
                im += [True] * n
                lab += [IGNORE_ID] * n
                cr.append((tw, th))
                # values like the processor's Normalize(0.5, 0.5): in [-1, 1]
                tl.append(torch.rand(1 + tw * th, 3, size, size, generator=g) * 2 - 1)
            else:
                t = text(payload)
                ids += t
                im += [False] * len(t)
                lab += t if kind == "a" else [IGNORE_ID] * len(t)
        seqs.append(ids)
        img_masks.append(im)
        labels.append(lab)
        crops.append(cr)
        tiles.append(torch.cat(tl) if tl else torch.zeros(0, 3, size, size))

    bsz = len(plans)
    t_max = max(len(s) for s in seqs) + extra_pad
    max_tiles = max(max(t.shape[0] for t in tiles), 1)
    max_images = max(max(len(c) for c in crops), 1)
    out = {
        "input_ids": torch.full((bsz, t_max), PAD_ID, dtype=torch.long),
        "attention_mask": torch.zeros(bsz, t_max, dtype=torch.long),
        "images": torch.zeros(bsz, max_tiles, 3, size, size),
        "images_seq_mask": torch.zeros(bsz, t_max, dtype=torch.bool),
        "images_spatial_crop": torch.zeros(bsz, max_images, 2, dtype=torch.long),
        "labels": torch.full((bsz, t_max), IGNORE_ID, dtype=torch.long),
        "position_ids": torch.ones(bsz, t_max, dtype=torch.long),
    }
    for b in range(bsz):
        n = len(seqs[b])
        out["input_ids"][b, :n] = torch.tensor(seqs[b])
        out["attention_mask"][b, :n] = 1
        out["images_seq_mask"][b, :n] = torch.tensor(img_masks[b])
        out["labels"][b, :n] = torch.tensor(labels[b])
        out["position_ids"][b, :n] = torch.arange(n)  # pads keep position 1 (never seen by real tokens)
        out["images"][b, : tiles[b].shape[0]] = tiles[b]
        for j, (tw, th) in enumerate(crops[b]):
            out["images_spatial_crop"][b, j] = torch.tensor([tw, th])
    return out
