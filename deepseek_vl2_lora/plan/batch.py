"""The batch a dry run plans for: every sample fills `data.max_length` tokens, laid out as the processor lays out
a conversation (bos, the images' tokens, the prompt, the supervised answer ending in eos), collated by the
training collator (padding, packing) exactly as training collates it. With token-budget batching
(`data.tokens_per_micro_batch`) every row of the micro batch is full: the budget is the step's token count."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from ..data.collate import Collator
from ..model.deepseek_vl2 import IGNORE_INDEX
from ..model.processor_config import image_token_count
from ..training.config import ConfigError
from ..training.preflight import train_max_length


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


def synthetic_samples(vl2_config, n: int, length: int, plan_cfg, layout: dict | None = None) -> list[dict]:
    """`n` encoded samples (the processor's fields) of `length` tokens each; token ids and pixels are placeholders.
    `layout`: their `sample_layout` (None: computed)."""
    layout = layout or sample_layout(vl2_config, length, plan_cfg)
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


def planned_length(data_cfg, trainer_cfg) -> int:
    """The sample length a dry run plans: the longest training sample (data.max_length; with a token budget at most
    a row), 4096 when data.max_length is unset."""
    return train_max_length(data_cfg, trainer_cfg) or 4096


def budget_rows(vl2_config, rows: int, pack_length: int, length: int, plan_cfg) -> list[list[dict]]:
    """The rows of a token-budget micro batch as planned: each full, ⌊pack_length / L⌋ samples of L tokens
    (`planned_length`) plus one of the rest (text only when it cannot hold the images)."""
    per_row, rest = divmod(pack_length, length)
    row = synthetic_samples(vl2_config, per_row, length, plan_cfg)
    if rest >= 3:  # (bos, a prompt token, an answer token at least)
        try:
            layout = sample_layout(vl2_config, rest, plan_cfg)
        except PlanError:
            text_only = SimpleNamespace(
                image_tiles=plan_cfg.image_tiles, images_per_sample=0, answer_fraction=plan_cfg.answer_fraction
            )
            layout = sample_layout(vl2_config, rest, text_only)
        row += synthetic_samples(vl2_config, 1, rest, plan_cfg, layout)
    return [list(row) for _ in range(rows)]


def plan_batch(vl2_config, micro_batch: int, data_cfg, trainer_cfg, plan_cfg) -> dict:
    """The micro batch a dry run plans for: `micro_batch` samples of `planned_length`, or with
    data.tokens_per_micro_batch `micro_batch` full rows (`budget_rows`)."""
    length = planned_length(data_cfg, trainer_cfg)
    if not data_cfg.get("tokens_per_micro_batch"):
        return synthetic_batch(vl2_config, micro_batch, length, plan_cfg, trainer_cfg.pack_length)
    rows = budget_rows(vl2_config, micro_batch, trainer_cfg.pack_length, length, plan_cfg)
    return Collator(pad_id=0, padding_side="right", pack_length=trainer_cfg.pack_length).collate_rows(rows)
