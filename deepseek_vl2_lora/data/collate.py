"""Batching encoded samples: right padding for training (optionally packed rows), left padding for generation."""

from __future__ import annotations

import torch

from .packing import pack_rows, pack_samples
from .tiling import tile_key


class Collator:
    """Pads encoded samples into a batch.

    Right padding is for training, left padding for generation. `position_ids` count 0..len-1 over each
    sample's real tokens and are 0 on padding, so left-padded prompts still start at position 0 (the LM's
    default arange would not). `attention_mask` is long 1/0. Tiles are zero-padded to the batch maximum and
    `images_spatial_crop` with [0, 0] rows, as in the official `batchify`. Non-tensor fields (e.g. a reference
    answer string) are gathered into lists.

    With `pack_length`, the samples are first packed into rows of at most that many tokens
    (`deepseek_vl2_lora.data.packing`): the batch then has one row per pack and a `segment_ids` field.
    `collate_rows` packs rows chosen beforehand (token-budget batching, `data.budget`) exactly as given.
    """

    def __init__(
        self,
        pad_id: int,
        padding_side: str = "right",
        ignore_id: int = -100,
        tile_keys: bool = False,
        pack_length: int | None = None,
    ):
        if padding_side not in ("right", "left"):
            raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
        if pack_length is not None and padding_side != "right":
            raise ValueError("packing is for training batches: use padding_side='right'")
        self.pad_id = pad_id
        self.padding_side = padding_side
        self.ignore_id = ignore_id
        self.tile_keys = tile_keys  # add `tile_keys` (content hashes per tile) for the vision feature cache
        self.pack_length = pack_length

    def _pad_1d(self, seqs: list[torch.Tensor], value, length: int) -> torch.Tensor:
        out = torch.full((len(seqs), length), value, dtype=seqs[0].dtype)
        for b, seq in enumerate(seqs):
            if self.padding_side == "right":
                out[b, : len(seq)] = seq
            else:
                out[b, length - len(seq) :] = seq
        return out

    @staticmethod
    def _pad_first_dim(tensors: list[torch.Tensor]) -> torch.Tensor:
        n = max(t.shape[0] for t in tensors)
        out = tensors[0].new_zeros((len(tensors), n, *tensors[0].shape[1:]))
        for b, t in enumerate(tensors):
            out[b, : t.shape[0]] = t
        return out

    def __call__(self, samples: list[dict]) -> dict:
        if not samples:
            raise ValueError("cannot collate an empty batch")
        if self.pack_length is not None:
            samples = pack_samples(samples, self.pack_length, self.ignore_id)
        return self._collate(samples)

    def collate_rows(self, rows: list[list[dict]]) -> dict:
        """A packed batch with exactly these rows (each a list of encoded samples, in row order)."""
        if self.pack_length is None or not rows or not all(rows):
            raise ValueError("collate_rows needs pack_length and a non-empty list of non-empty rows")
        for members in rows:
            total = sum(len(s["input_ids"]) for s in members)
            if total > self.pack_length:
                raise ValueError(
                    f"a packed row holds {total} tokens, more than trainer.pack_length={self.pack_length}: a sample "
                    "encoded to another length than validation computed (its file changed since?)"
                )
        return self._collate(pack_rows(rows, self.ignore_id))

    def _collate(self, samples: list[dict]) -> dict:
        length = max(len(s["input_ids"]) for s in samples)
        lengths = [len(s["input_ids"]) for s in samples]
        positions = [s.get("position_ids", torch.arange(n, dtype=torch.long)) for s, n in zip(samples, lengths)]
        batch = {
            "input_ids": self._pad_1d([s["input_ids"] for s in samples], self.pad_id, length),
            "attention_mask": self._pad_1d([torch.ones(n, dtype=torch.long) for n in lengths], 0, length),
            "labels": self._pad_1d([s["labels"] for s in samples], self.ignore_id, length),
            "position_ids": self._pad_1d(positions, 0, length),
            "images_seq_mask": self._pad_1d([s["images_seq_mask"] for s in samples], False, length),
            "images": self._pad_first_dim([s["images"] for s in samples]),
            "images_spatial_crop": self._pad_first_dim([s["images_spatial_crop"] for s in samples]),
        }
        if "segment_ids" in samples[0]:
            batch["segment_ids"] = self._pad_1d([s["segment_ids"] for s in samples], 0, length)
        for key in samples[0]:
            if key not in batch and not isinstance(samples[0][key], torch.Tensor):
                batch[key] = [s.get(key) for s in samples]
        if self.tile_keys:
            batch["tile_keys"] = [[tile_key(t) for t in s["images"]] for s in samples]
        return batch
