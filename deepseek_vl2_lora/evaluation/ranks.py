"""Evaluation split across ranks: each rank runs a slice of the batches, the results are gathered, and every rank
(rank 0 logs and writes them) ends with what one process computes.

The batches are the ones one process makes (the same items, the same padding), dealt round robin: rank r runs
batches r, r + W, r + 2W, ... With replicated weights (one process, DDP, ZeRO-1/2) a rank runs its own batches and
nothing else. Under ZeRO-3, where every forward gathers the sharded weights from all ranks, every rank runs the same
number of batch slots: a rank with no batch left in a slot runs a padding forward (one token, no image) or a
padding generation, which counts as finished from the start. So every rank runs every forward, and generation
steps stay in lockstep (`model.generation`'s all-ranks-done check ends a step loop on every rank at
once). There, a batch without images runs the vision side on a blank tile as well (`vision_in_every_forward`),
since a rank whose batch has images gathers the vision weights. The gathered per-batch results are put back in
batch order before anything is summed, so sums, predictions and metrics are bitwise those of one process.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class EvalRanks:
    rank: int = 0
    world_size: int = 1
    zero3: bool = False  # the weights are sharded (DeepSpeed ZeRO-3): every rank must run every forward

    @property
    def lockstep(self) -> bool:
        """Every rank must run every forward (padding ones included) and generate in step: several ranks under
        ZeRO-3. Otherwise each rank runs only its own batches and stops generating when its rows are done."""
        return self.zero3 and self.world_size > 1

    def slots(self, n_batches: int) -> list[int | None]:
        """The batches this rank runs, one per slot (None: a padding one); every rank gets as many slots."""
        w, r = self.world_size, self.rank
        return [s * w + r if s * w + r < n_batches else None for s in range(-(-n_batches // w))]

    def gather(self, items: list) -> list:
        """Every rank's `items` (picklable), concatenated in rank order, on every rank. A collective."""
        if self.world_size == 1:
            return list(items)
        parts = [None] * self.world_size
        torch.distributed.all_gather_object(parts, list(items))
        return [x for part in parts for x in part]

    @contextmanager
    def evaluating(self, model):
        """The model in eval mode inside the block, and under ZeRO-3 with several ranks running the vision side in
        every forward (see the module docstring); its own settings are back afterwards."""
        was_training, vision = model.training, getattr(model, "vision_in_every_forward", False)
        model.eval()
        if self.zero3 and self.world_size > 1:
            model.vision_in_every_forward = True
        try:
            yield
        finally:
            model.train(was_training)
            model.vision_in_every_forward = vision


ONE_PROCESS = EvalRanks()  # the default: no split


def padding_batch(processor, device: torch.device) -> dict:
    """A one-token text-only batch (the pad token, no label): a padding rank's forward or generation prompt."""
    s = processor.image_size
    return {
        "input_ids": torch.full((1, 1), processor.pad_id, dtype=torch.long, device=device),
        "attention_mask": torch.ones(1, 1, dtype=torch.long, device=device),
        "labels": torch.full((1, 1), -100, dtype=torch.long, device=device),
        "position_ids": torch.zeros(1, 1, dtype=torch.long, device=device),
        "images_seq_mask": torch.zeros(1, 1, dtype=torch.bool, device=device),
        "images": torch.zeros(1, 1, 3, s, s, device=device),
        "images_spatial_crop": torch.zeros(1, 1, 2, dtype=torch.long, device=device),
    }
