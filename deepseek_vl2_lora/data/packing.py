"""Packing: several encoded samples per row, each attending only to itself.

A micro batch's samples are placed into rows of at most `capacity` tokens (first-fit decreasing), so a batch of
mixed lengths carries little padding. The loss is the same function as without packing: labels keep their
positions, position ids restart at 0 for every sample, and `segment_ids` (1, 2, ... per row; 0 = padding)
make attention block-diagonal. Only the MoE's sequence-level aux loss sees rows instead of samples.
"""

from __future__ import annotations

import torch


def first_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Rows of sample indices, each row's total length ≤ capacity; a sample longer than capacity gets a row of
    its own. Longest first, each into the first row it fits (ties keep the input order); deterministic."""
    if capacity < 1:
        raise ValueError(f"pack capacity must be ≥ 1 token, got {capacity}")
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda j: -lengths[j]):
        n = lengths[i]
        for r, free in enumerate(room):
            if n <= free:
                rows[r].append(i)
                room[r] -= n
                break
        else:
            rows.append([i])
            room.append(capacity - n)
    return rows


def _real_images(sample: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(tiles, crop rows) of the images a sample really has (text-only samples carry a zero placeholder)."""
    crop = sample["images_spatial_crop"]
    crop = crop[(crop[:, 0] > 0) & (crop[:, 1] > 0)]
    n_tiles = int((crop[:, 0] * crop[:, 1] + 1).sum())
    return sample["images"][:n_tiles], crop


def pack_samples(samples: list[dict], capacity: int, ignore_id: int = -100) -> list[dict]:
    """Merge encoded samples into packed-row samples, rows chosen by first-fit decreasing (`pack_rows`)."""
    rows = first_fit_decreasing([len(s["input_ids"]) for s in samples], capacity)
    return pack_rows([[samples[i] for i in row] for row in rows], ignore_id)


def pack_rows(rows: list[list[dict]], ignore_id: int = -100) -> list[dict]:
    """Merge each row's encoded samples into one packed-row sample (the fields `Collator` pads, plus
    `position_ids` and `segment_ids`). Within a row, tokens, labels, image masks, tiles and crop rows are
    concatenated in the row's sample order, so each image's features land on its own sample's image tokens. Each
    sample's first label is ignored: it would be predicted from the previous sample's last token. Non-tensor
    fields become lists."""
    packed = []
    for members in rows:
        labels = []
        for s in members:
            lab = s["labels"].clone()
            lab[0] = ignore_id
            labels.append(lab)
        tiles, crops = zip(*(_real_images(s) for s in members))
        tiles, crops = torch.cat(tiles), torch.cat(crops)
        if crops.shape[0] == 0:  # no images in this row: the official text-only placeholder
            tiles = tiles.new_zeros((1, *members[0]["images"].shape[1:]))
            crops = crops.new_zeros((1, 2))
        merged = {
            "input_ids": torch.cat([s["input_ids"] for s in members]),
            "labels": torch.cat(labels),
            "images_seq_mask": torch.cat([s["images_seq_mask"] for s in members]),
            "images": tiles,
            "images_spatial_crop": crops,
            "position_ids": torch.cat([torch.arange(len(s["input_ids"])) for s in members]),
            "segment_ids": torch.cat(
                [torch.full((len(s["input_ids"]),), j + 1, dtype=torch.long) for j, s in enumerate(members)]
            ),
        }
        for key, value in members[0].items():
            if key not in merged and not isinstance(value, torch.Tensor):
                merged[key] = [s.get(key) for s in members]
        packed.append(merged)
    return packed


def sample_lengths(batch: dict) -> list[int]:
    """Real-token length of every sample in a collated batch, packed (`segment_ids`) or not."""
    if "segment_ids" not in batch:
        return batch["attention_mask"].sum(dim=1).tolist()
    lengths = []
    for row in batch["segment_ids"].cpu():
        lengths += torch.bincount(row[row > 0]).tolist()[1:]
    return lengths
