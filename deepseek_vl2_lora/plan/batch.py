"""The batch a dry run plans for: every sample fills `data.max_length` tokens, laid out as the processor lays out
a conversation (bos, the images' tokens, the prompt, the supervised answer ending in eos), collated by the
training collator (padding, packing) exactly as training collates it."""

from __future__ import annotations

import torch

from ..data.collate import Collator
from ..model.deepseek_vl2 import IGNORE_INDEX
from ..model.processor_config import image_token_count
from ..training.config import ConfigError


class PlanError(ConfigError):
    """The dry run cannot plan this config; the message says what to change."""


def sample_layout(vl2_config, length: int, plan_cfg) -> dict:
    """Token counts of one planned sample: images, image tokens, text tokens, supervised (answer) tokens."""
    v = vl2_config.vision
    tw, th = plan_cfg.image_tiles
    per_image = image_token_count(v.image_size, v.patch_size, vl2_config.projector.downsample_ratio, tw, th)
    image_tokens = plan_cfg.images_per_sample * per_image
    text = length - 1 - image_tokens  # bos first
    if text < 2:
        raise PlanError(
            f"data.max_length={length} cannot hold plan.images_per_sample={plan_cfg.images_per_sample} image(s) of "
            f"{per_image} tokens ({tw}×{th} tiles + the global view) plus a prompt and an answer; raise "
            "data.max_length or lower plan.image_tiles / plan.images_per_sample"
        )
    answer = max(1, min(text - 1, round(plan_cfg.answer_fraction * text)))
    return {
        "images": plan_cfg.images_per_sample,
        "tiles_per_image": 1 + tw * th,
        "image_tokens": image_tokens,
        "text_tokens": text,
        "supervised_tokens": answer,
    }


def synthetic_samples(vl2_config, n: int, length: int, plan_cfg) -> list[dict]:
    """`n` encoded samples (the processor's fields) of `length` tokens each; token ids and pixels are placeholders."""
    layout = sample_layout(vl2_config, length, plan_cfg)
    size = vl2_config.vision.image_size
    vocab = vl2_config.language.vocab_size
    tw, th = plan_cfg.image_tiles
    samples = []
    for _ in range(n):
        ids = torch.arange(length) % (vocab - 2) + 2
        labels = torch.full((length,), IGNORE_INDEX)
        labels[-layout["supervised_tokens"] :] = ids[-layout["supervised_tokens"] :]
        mask = torch.zeros(length, dtype=torch.bool)
        mask[1 : 1 + layout["image_tokens"]] = True
        n_images = layout["images"]
        if n_images:
            pixels = torch.zeros(n_images * layout["tiles_per_image"], 3, size, size)
            crop = torch.tensor([[tw, th]] * n_images)
        else:  # the official text-only placeholder
            pixels, crop = torch.zeros(1, 3, size, size), torch.zeros(1, 2, dtype=torch.long)
        samples.append(
            {"input_ids": ids, "labels": labels, "images": pixels, "images_seq_mask": mask, "images_spatial_crop": crop}
        )
    return samples


def synthetic_batch(vl2_config, micro_batch_size: int, length: int, plan_cfg, pack_length: int | None) -> dict:
    return Collator(pad_id=0, padding_side="right", pack_length=pack_length)(
        synthetic_samples(vl2_config, micro_batch_size, length, plan_cfg)
    )
